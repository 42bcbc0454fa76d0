"""Fixtures of tests/integration (those shared with tests/unit are in tests/conftest.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from helpers import DDP2_JOB, DDP4_JOB, EXAMPLE, Background, Launch, Reference, child_env, kill_tree, torchrun

Started = TypeVar("Started", Background, Launch)


@pytest.fixture
def alongside() -> Iterator[Callable[[Started], Started]]:
    """Registers a reference run started alongside the chaos run it is compared with (``alongside(Launch(...))``,
    ``alongside(Background(...))``): a test that fails before waiting for it must not leave it running (and
    taking a core) into the next test."""
    started: list[Background | Launch] = []

    def register(run: Started) -> Started:
        started.append(run)
        return run

    yield register
    for run in started:
        if run.proc.poll() is None:
            kill_tree(run.proc)


# Uninterrupted runs that tests in several modules compare with, each run once per session (a test only reads
# them). Their jobs are in helpers.py.
def _reference(tmp: Path, job: list[str], nproc: int) -> Reference:
    ckpt, logs = tmp / "ckpt", tmp / "logs"
    run = torchrun(EXAMPLE, [*job, "--ckpt-dir", str(ckpt), "--index-log", str(logs)], child_env(), nproc=nproc,
                   check=True)
    return Reference(run, ckpt, logs)


@pytest.fixture(scope="session")
def ddp4_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """:data:`DDP4_JOB` at 4 ranks (test_nodelocal.py, test_resume_exact.py)."""
    return _reference(tmp_path_factory.mktemp("ddp4-reference"), DDP4_JOB, 4)


@pytest.fixture(scope="session")
def ddp2_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """:data:`DDP2_JOB` at 2 ranks (test_resume_exact.py, test_stop.py)."""
    return _reference(tmp_path_factory.mktemp("ddp2-reference"), DDP2_JOB, 2)
