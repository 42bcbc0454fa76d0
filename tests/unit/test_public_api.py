"""The public API as a user sees it: what their type checker makes of ``import ftrain``, and ``with Session()``.

The type checks run mypy (the ``lint`` extra) on small user scripts, with ftrain found the way an installed package
is (PEP 561: on the path, not as source), so ``ftrain/py.typed`` is what makes them pass.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ftrain
from ftrain import exitcodes, faults
from ftrain.checkpoint.format import LEASE_RECORD
from ftrain.checkpoint.store import CheckpointStore

from helpers import Job, cfg

PKG = Path(ftrain.__file__).resolve().parent

# A user's script: every line type-checks under --strict. Session is built as in examples/train.py.
GOOD = '''\
import ftrain

reveal_type(ftrain.Session)
config = ftrain.FtrainConfig(checkpoint=ftrain.CheckpointConfig(dir="ckpt", every_steps=10),
                             early_stopping=ftrain.EarlyStoppingConfig(patience=3),
                             supervisor=ftrain.SupervisorConfig(grace_seconds=10.0))
with ftrain.Session(config, total_steps=100) as session:
    reveal_type(session)
    counters = ftrain.Counters(seen=0)
    session.register(counters=counters)
    session.register("extra", ftrain.Counters(n=1), per_rank=True)
    step: int = session.restore()
    saved: bool = session.step(step + 1)
    session.close()
try:
    ftrain.Session(overrides={"checkpoint.every_steps": 5}).close()
except ftrain.UsageError as e:
    code: int = e.exit_code
except ftrain.Preempted as p:
    last: int = p.step
'''

# One mistake per line from line 3 on: mypy must report each (the check can fail).
BAD = '''\
import ftrain

session = ftrain.Session(total_step=3)
session.restore(42, "x")
ok: bool = session.step("3")
config = ftrain.FtrainConfig(checkpoint=ftrain.SupervisorConfig())
'''
BAD_LINES = (3, 4, 5, 6)


@pytest.fixture(scope="module")
def mypy_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A directory to run mypy in, and the environment that puts ftrain on the path as an installed package."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (the lint extra: make lint)")
    work = tmp_path_factory.mktemp("mypy")
    site = work / "site"
    site.mkdir()
    (site / "ftrain").symlink_to(PKG)  # the editable install's import hook is invisible to mypy
    # torch's own modules are skipped: analysing them costs ~15 s cold and is not what is checked here.
    (work / "mypy.ini").write_text(f"[mypy]\nstrict = True\ncache_dir = {work / 'cache'}\n"
                                   "[mypy-torch.*]\nfollow_imports = skip\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env.pop("MYPYPATH", None)  # a source path would find ftrain without its py.typed
    yield work, env


def mypy(where: tuple[Path, dict[str, str]], name: str, code: str) -> subprocess.CompletedProcess[str]:
    work, env = where
    (work / name).write_text(code)
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(work / "mypy.ini"), name],
                          cwd=work, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # starts processes
def test_a_users_script_type_checks_against_the_real_types(mypy_in: tuple[Path, dict[str, str]]) -> None:
    out = mypy(mypy_in, "good.py", GOOD)
    assert out.returncode == 0, out.stdout + out.stderr
    revealed = [line for line in out.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 2, out.stdout
    # The class itself (its constructor's signature), not the `object` a bare module __getattr__ gives.
    assert "-> ftrain.session.session.Session" in revealed[0] and "config: ftrain.config.sections.FtrainConfig" in revealed[0]
    assert revealed[1].endswith('"ftrain.session.session.Session"'), revealed[1]


@pytest.mark.slow  # starts processes
def test_a_users_type_errors_are_caught(mypy_in: tuple[Path, dict[str, str]]) -> None:
    out = mypy(mypy_in, "bad.py", BAD)
    assert out.returncode == 1, out.stdout + out.stderr
    flagged = {int(line.split(":")[1]) for line in out.stdout.splitlines() if line.startswith("bad.py:")
               and ": error:" in line}
    assert flagged == set(BAD_LINES), out.stdout


@pytest.mark.slow  # starts processes
def test_import_ftrain_and_its_config_and_errors_import_no_torch() -> None:
    code = ("import sys, ftrain\nftrain.FtrainConfig, ftrain.CheckpointConfig, ftrain.UsageError\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_lazy_name_is_typed_exported_and_resolves() -> None:
    tree = ast.parse((PKG / "__init__.py").read_text())
    typed = {alias.asname or alias.name for node in ast.walk(tree)
             if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
             for sub in node.body if isinstance(sub, ast.ImportFrom) for alias in sub.names}
    lazy = set(ftrain._LAZY)
    assert typed == lazy, "the TYPE_CHECKING imports and _LAZY of ftrain/__init__.py differ"
    assert lazy <= set(ftrain.__all__)
    for name in ftrain.__all__:
        assert getattr(ftrain, name) is not None, name
    assert ftrain.FtrainConfig.__dataclass_fields__.keys() == {"checkpoint", "data", "early_stopping", "supervisor"}
    assert (PKG / "py.typed").is_file()


def test_the_py_typed_marker_is_packaged() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["ftrain"]


# ----------------------------------------------------------------------------------------------- with Session()
def hooks() -> tuple[object, object]:
    """The process-global hooks a live Session replaces: the exception hook and SIGTERM's handler."""
    return sys.excepthook, signal.getsignal(signal.SIGTERM)


def test_the_end_of_the_block_closes_the_session(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = hooks()
    job = Job()
    with ftrain.Session(cfg(ckpt_dir, every_steps=2)) as session:
        job.register(session)
        assert session.restore() == 0
        assert (ckpt_dir / LEASE_RECORD).is_file() and hooks() != before
        for step in (1, 2):
            job.train(1)
            session.step(step)  # step 2's save is still being written in the background when the block ends
    assert CheckpointStore(ckpt_dir).steps() == [2]  # close() waited for it to commit
    assert not (ckpt_dir / LEASE_RECORD).exists() and hooks() == before

    closes: list[ftrain.Session] = []
    close = ftrain.Session.close
    monkeypatch.setattr(ftrain.Session, "close", lambda self: (closes.append(self), close(self))[1])
    with ftrain.Session(cfg(ckpt_dir, every_steps=2)) as session:
        job.register(session)
        assert session.restore() == 2
        session.close()
    assert closes == [session]  # closed in the block: the end of the block adds nothing
    assert hooks() == before


def test_an_error_in_the_block_propagates_unchanged_and_still_closes(ckpt_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("raise@save.mid_write:step=2"))
    before = hooks()
    err = RuntimeError("the training step failed")
    job = Job()
    with pytest.raises(RuntimeError) as raised, ftrain.Session(cfg(ckpt_dir, every_steps=1)) as session:
        job.register(session)
        session.restore()
        for step in (1, 2):  # step 2's save fails in the background: close() would raise for it
            job.train(1)
            session.step(step)
        job.train(1)
        raise err
    try:
        assert raised.value is err  # not the failed save's CheckpointError, nor wrapped in it
        assert CheckpointStore(ckpt_dir).steps() == [1]  # nothing new committed
        assert not (ckpt_dir / LEASE_RECORD).exists()  # the lease is given back
        # Still armed, so that an uncaught error reaches the supervisor as an error file (see Session.__exit__).
        assert hooks() != before
    finally:
        session.close()  # what a script that catches the error and goes on should do: the hooks go
    assert hooks() == before


def test_preempted_propagates_after_a_normal_end(ckpt_dir: Path) -> None:
    before = hooks()
    job = Job()
    with pytest.raises(ftrain.Preempted) as raised, ftrain.Session(cfg(ckpt_dir, every_steps=100)) as session:
        job.register(session)
        session.restore()
        job.train(1)
        session.step(1)
        signal.raise_signal(signal.SIGTERM)  # only sets the flag: every rank saves at the next step
        job.train(1)
        session.step(2)
    assert raised.value.code == exitcodes.PREEMPTED and raised.value.step == 2
    assert CheckpointStore(ckpt_dir).steps() == [2]
    assert not (ckpt_dir / LEASE_RECORD).exists() and hooks() == before


def test_a_clean_exit_in_the_block_still_reports_a_failed_save(ckpt_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("raise@save.mid_write:step=1"))
    before = hooks()
    job = Job()
    # sys.exit(0) ends the block normally: close() runs and raises the failed save's error (the process must not
    # exit 0 over it).
    with pytest.raises(faults.InjectedFault), ftrain.Session(cfg(ckpt_dir, every_steps=1)) as session:
        job.register(session)
        session.restore()
        job.train(1)
        session.step(1)
        sys.exit(0)
    assert CheckpointStore(ckpt_dir).steps() == []
    assert not (ckpt_dir / LEASE_RECORD).exists() and hooks() == before
