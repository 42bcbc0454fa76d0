"""A Session in a real process: a disk-full-like write failure, an exit without close() after a failed save,
and a preemption after a failed background save."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftrain.checkpoint import format as layout
from ftrain.cli import main as cli

from helpers import ROOT, child_env

pytestmark = pytest.mark.slow


def test_file_size_limit_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes writes fail like a full disk; the save must fail loudly and leave step 10 valid."""
    root = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import resource, signal, sys, time, torch, ftrain
        from ftrain.config import CheckpointConfig, FtrainConfig
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        model = torch.nn.Linear(64, 64)
        s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir={str(root)!r})))
        s.register(model=model)
        s.restore()
        s.save(10, blocking=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            s.save(20)
            for step in range(21, 1000):  # a background write's failure surfaces at the next step after it
                s.step(step)
                time.sleep(0.01)
        except ftrain.FtrainError as e:
            print("ERROR:", e)
            sys.exit(e.exit_code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "saving step 20 failed" in proc.stdout and "File too large" in proc.stdout, proc.stdout
    # The lease's lock file stays; its record was removed at exit. The event log records the run.
    assert sorted(p.name for p in root.iterdir()) == sorted([layout.LATEST, layout.LEASE_LOCK, layout.DISK_ID,
                                                             "events", layout.step_dirname(10)])
    assert cli(["ckpt", "verify", str(root)]) == 0


def _script(body: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    head = textwrap.dedent(f"""
        import os, signal, sys, time, torch, ftrain
        from ftrain.config import CheckpointConfig, FtrainConfig
        model = torch.nn.Linear(8, 8)
        s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir={str(root)!r}, every_steps=2)))
        s.register(model=model)
        s.restore()
    """)
    return subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], env=child_env(**env),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_exit_without_close_fails_loudly_if_the_last_save_did_not_commit(tmp_path):
    root = tmp_path / "ckpt"
    proc = _script("""
        for step in range(1, 5):
            s.step(step)
        s.save(5)  # the background write of step 5 fails; the script never calls close()
    """, root, FTRAIN_FAULTS="raise@save.mid_write:step=5")
    assert proc.returncode == 1, proc.stderr
    assert "the last checkpoint did not commit" in proc.stderr
    assert sorted(p.name for p in root.glob("step-*")) == [layout.step_dirname(2), layout.step_dirname(4)]


def test_preemption_checkpoint_is_taken_even_if_the_previous_background_save_failed(tmp_path):
    root = tmp_path / "ckpt"
    proc = _script("""
        s.step(1)
        s.step(2)  # its background write fails (injected)
        time.sleep(0.5)  # whether or not the failure is already known at the next step
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice: only sets a flag
        s.step(3)
    """, root, FTRAIN_FAULTS="raise@save.mid_write:step=2")
    assert proc.returncode == 75, proc.stderr
    assert "previous background save failed" in proc.stderr
    assert [p.name for p in root.glob("step-*")] == [layout.step_dirname(3)]
    assert cli(["ckpt", "verify", str(root)]) == 0
