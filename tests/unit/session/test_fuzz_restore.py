"""Property-based fuzzing of restore against resealed hostile checkpoints.

Each example takes a real checkpoint made by the project's API (steps 10 and
20 of one run), mutates one value deep inside the newest one's manifest body or
rank 0's shard record (replace it with arbitrary JSON, delete it, add a key),
reseals checksums the way an attacker who knows the format would, and restores
into fresh objects. The property: restore either returns a step (falling back
to step 10 loads exactly step 10) or raises a clear :class:`FtrainError`; never
anything else, and whenever it raises, the registered objects are
bit-identical to before.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftrain
from ftrain.checkpoint import format as fmt
from ftrain.errors import FtrainError

from helpers import Job, cfg, job_state, reseal, reseal_file

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def run(root: Path, steps: int) -> Job:
    job = Job()
    session = ftrain.Session(cfg(root, every_steps=10))
    job.register(session)
    for step in range(session.restore() + 1, steps + 1):
        job.train(1)
        session.step(step)
    session.close()
    return job


def restore(root: Path) -> tuple[Job, str, int | BaseException]:
    """A fresh job, its state before the restore, and the step restored (or what restore raised)."""
    job = Job()
    before = job_state(job)
    session = ftrain.Session(cfg(root))
    job.register(session)
    try:
        return job, before, session.restore()
    except FtrainError as e:
        return job, before, e
    finally:
        session.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The checkpoint root, and the state a clean restore of step 10 gives."""
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    run(root, 20)
    only10 = root.parent / "only10"
    shutil.copytree(root / fmt.step_dirname(10), only10 / fmt.step_dirname(10))
    job, _, step = restore(only10)
    assert step == 10
    return root, job_state(job)


def mutate(data: st.DataObject, tree: Any, top: bool = False) -> Any:
    """``tree`` with one value somewhere inside it replaced, deleted or added to (in place below the top)."""
    leaf = not isinstance(tree, (dict, list)) or not tree
    if leaf or (not top and data.draw(st.integers(0, 4), label="stop") == 0):
        return data.draw(JSON, label="replacement")
    key = data.draw(st.sampled_from(sorted(tree) if isinstance(tree, dict) else list(range(len(tree)))), label="key")
    op = data.draw(st.sampled_from(["descend", "descend", "descend", "delete", "add"]), label="op")
    if op == "delete":
        tree.pop(key)
    elif op == "add" and isinstance(tree, dict):
        tree[data.draw(st.text(max_size=8), label="new key")] = data.draw(JSON, label="new value")
    else:
        tree[key] = mutate(data, tree[key])
    return tree


@settings(max_examples=int(os.environ.get("FTRAIN_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), target=st.sampled_from(["manifest", "shard"]))
def test_restore_of_a_mutated_checkpoint_falls_back_or_refuses_cleanly(
        pristine: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, target: str) -> None:
    src, state_of_10 = pristine
    root = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("lease*"))  # only the checkpoints
    d = root / fmt.step_dirname(20)
    if target == "manifest":
        reseal(d / fmt.MANIFEST, lambda body: mutate(data, body, top=True))
    else:
        name = fmt.shard_names(0)[0]
        record = mutate(data, json.loads((d / name).read_bytes()), top=True)
        reseal_file(d, name, json.dumps(record).encode())
    job, before, outcome = restore(root)
    if isinstance(outcome, BaseException):
        assert job_state(job) == before, f"restore raised {outcome!r} after changing the registered objects"
    else:
        assert outcome in (10, 20)
        if outcome == 10:
            assert job_state(job) == state_of_10
