"""A stop that arrives before torchrun has spawned its workers still reaches every worker (issue 10a).

SIGTERM goes to `ftrain launch` the moment it reports "attempt 0: started", while torchrun is still importing
torch: no worker exists to signal. The workers that start afterwards must still save one final checkpoint
at their first step and leave (exit 75, preempted.json), and a relaunch must finish bit-identical to an
uninterrupted run. A run that has nothing left to do when the stop lands finishes and exits 0.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftrain import exitcodes

from helpers import (
    DDP2_JOB,
    EXAMPLE,
    Launch,
    Reference,
    assert_no_orphans,
    assert_same_tensors,
    checkpoint_tensors,
    child_env,
    final_hash,
    launch_env,
)

pytestmark = pytest.mark.slow

STEPS = int(DDP2_JOB[1])  # the job of ddp2_reference (conftest.py), the uninterrupted run compared with
EVERY = 5
GRACE = 60.0  # generous: the workers start well inside it; a stop that did not reach them would let the job finish
STARTED = r"attempt 0: started torchrun"


def launch(ckpt: Path, run_id: str, *script_args: str) -> Launch:
    return Launch(["--nproc", "2", "--ckpt-dir", str(ckpt), "--save-every-steps", str(EVERY), "--grace-seconds",
                   str(GRACE), "--rdzv-id", run_id, str(EXAMPLE), "--steps", str(STEPS), *script_args], launch_env())


def stop_at_start(run: Launch) -> float:
    """SIGTERM the launcher as soon as it says the attempt started (torchrun has no workers yet)."""
    run.wait_for(STARTED, timeout=60)
    run.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def steps_in(ckpt: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in ckpt.iterdir() if p.name.startswith("step-"))


def test_stop_during_startup_reaches_the_workers_that_start_later(tmp_path: Path, ddp2_reference: Reference) -> None:
    # The same job at 2 ranks, uninterrupted (shared; it saves at other steps, which changes nothing trained).
    ref_hash = final_hash(ddp2_reference.run.stdout)

    ckpt = tmp_path / "ckpt"
    run = launch(ckpt, "stop", "--step-sleep", "0.05")
    t0 = stop_at_start(run)
    rc = run.wait()
    elapsed = time.monotonic() - t0
    out = run.output
    assert rc == exitcodes.PREEMPTED, out[-4000:]
    assert "SIGTERM: asked 0 worker(s) to save and exit" in out, out[-4000:]  # the window was hit: none yet
    assert elapsed < GRACE, f"took {elapsed:.1f}s: the job was killed by the grace period, not stopped"
    [attempt] = (ckpt / "logs" / "stop").glob("*/attempt-000")
    assert json.loads((attempt / "stop.json").read_text())["signal"] == "SIGTERM"
    marker = json.loads((attempt / "preempted.json").read_text())
    # The workers saved at their first step: the only checkpoint, and not one the schedule took.
    assert marker["step"] == 1 and steps_in(ckpt) == [1], (marker, steps_in(ckpt), out[-4000:])
    assert "final checkpoint at step 1" in out
    verify = subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "verify", str(ckpt)], env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert_no_orphans("stop")

    again = launch(ckpt, "stop")
    assert again.wait() == 0, again.output[-4000:]
    assert "restored step 1 " in again.output
    assert final_hash(again.output) == ref_hash, "the resumed run's final state differs from the uninterrupted one"
    assert_same_tensors(checkpoint_tensors(ckpt), checkpoint_tensors(ddp2_reference.ckpt))
    assert_no_orphans("stop")

    # The same command once more, stopped during startup again: the run has nothing left to do, so its
    # workers restore the last step and finish without reaching a step boundary. Done, not preempted.
    done = launch(ckpt, "stop")
    stop_at_start(done)
    assert done.wait() == exitcodes.OK, done.output[-4000:]
    assert "the job finished before the stop (SIGTERM) took effect" in done.output, done.output[-4000:]
    assert final_hash(done.output) == ref_hash
    assert steps_in(ckpt)[-1] == STEPS
    assert not list((ckpt / "logs" / "stop").glob("*/attempt-002/preempted.json"))
    assert_no_orphans("stop")
