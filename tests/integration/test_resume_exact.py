"""Bit-exact resume of the real example after real SIGKILLs, at random steps and inside saves.

The reference is an uninterrupted run; the interrupted run is killed several
times and restarted by the test each time. Final model/optimizer state must be
bit-identical (``final_state_sha256`` hashes every tensor's bytes), and every
step must have consumed exactly the same samples.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import (
    DDP2_JOB,
    DDP4_JOB,
    EXAMPLE,
    assert_same_tensors,
    checkpoint_tensors,
    child_env,
    final_hash,
    processes_mentioning,
    read_index_log,
    run_example,
    torchrun,
)

pytestmark = pytest.mark.slow

STEPS = 70
EVERY = 7
# Each fires once (marker files in FTRAIN_FAULTS_ONCE_DIR): a kill in the middle of writing the tensor bytes,
# one after the manifest is written but before the directory is renamed, one before `latest` is updated, and
# one while the snapshot is being taken. (Saves are asynchronous: the first three hit the background writer.)
FAULTS = ("kill@save.mid_write:step=21,kill@save.before_rename:step=42,kill@save.before_latest:step=56,"
          "kill@save.begin:step=63")


def common_args(ckpt: Path, logs: Path) -> list[str]:
    return ["--steps", str(STEPS), "--save-every", str(EVERY), "--ckpt-dir", str(ckpt), "--index-log", str(logs),
            "--print-every", "1"]


def run_and_maybe_kill(args: list[str], env: dict[str, str], kill_at: int | None) -> tuple[int, str, str]:
    """Run the example; if ``kill_at`` is set, SIGKILL it once it reports that step. Returns (rc, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    children: list[psutil.Process] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        m = re.match(r"step (\d+) ", line)
        if kill_at is not None and m and int(m.group(1)) >= kill_at:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            break
    rc = proc.wait(timeout=120)
    err = proc.stderr.read() if proc.stderr else ""
    # DataLoader workers must not outlive their killed parent (they watch it and exit).
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphaned DataLoader workers after SIGKILL: {alive}"
    return rc, "".join(out), err


def test_sigkill_at_random_steps_and_during_saves_resumes_bit_exact(tmp_path):
    ref = run_example(common_args(tmp_path / "ref-ckpt", tmp_path / "ref-logs"))
    ref_hash = final_hash(ref.stdout)
    ref_steps = read_index_log(tmp_path / "ref-logs", 0)
    assert sorted(ref_steps) == list(range(1, STEPS + 1))

    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    once = tmp_path / "once"
    once.mkdir()
    env = child_env(FTRAIN_FAULTS=FAULTS, FTRAIN_FAULTS_ONCE_DIR=str(once))
    args = common_args(tmp_path / "ckpt", tmp_path / "logs")
    # Random external kills, each between two of the injected in-save kills.
    external = [rng.randint(2, 20), rng.randint(22, 41), rng.randint(57, STEPS - 1)]
    restored: list[int] = []
    committed = 0  # newest step whose commit was logged so far
    for attempt in range(14):
        kill_at = external.pop(0) if external and attempt % 2 == 0 else None
        rc, out, err = run_and_maybe_kill(args, env, kill_at)
        got = [int(m) for m in re.findall(r"restored step (\d+)", err)]
        # A restart never loads a checkpoint older than the last one committed (checksums are verified on load).
        assert all(step >= committed for step in got), f"restored {got} after step {committed} was committed"
        restored += got
        committed = max([committed, *(int(m) for m in re.findall(r"saved step (\d+)", err))])
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"attempt {attempt} (seed {seed}) failed with {rc}:\n{err[-3000:]}"
    else:
        pytest.fail(f"did not finish in 14 attempts (seed {seed})")
    assert final_hash(out) == ref_hash, f"seed {seed}: resumed state differs from the uninterrupted run"
    # The final checkpoints (weights, optimizer moments, RNG, loader state): torch.equal on every tensor.
    assert_same_tensors(checkpoint_tensors(tmp_path / "ckpt"), checkpoint_tensors(tmp_path / "ref-ckpt"))
    assert len(list(once.iterdir())) == 4, "every injected in-save kill must have fired"
    assert attempt >= 6, f"expected at least 7 attempts (3 random kills + 4 in-save kills), got {attempt + 1}"
    # Kills inside the save of step 21 / 42 fall back to the previous checkpoint; the kill before `latest` does not.
    assert 14 in restored and 35 in restored and 56 in restored, restored
    steps = read_index_log(tmp_path / "logs", 0)  # also checks replayed steps saw the same samples
    assert steps == ref_steps, f"seed {seed}: consumed samples differ (skip or duplicate)"


def test_two_ranks_killed_inside_sharded_saves_resume_bit_exact(tmp_path, ddp2_reference):
    args = DDP2_JOB  # the job of the uninterrupted run (shared: conftest.py)
    ref = ddp2_reference
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    run_args = [*args, "--ckpt-dir", str(ckpt), "--index-log", str(logs)]
    once = tmp_path / "once"
    once.mkdir()
    # Rank 1 dies while writing its shard of step 20; then rank 0 dies after all shards but before the manifest.
    # The survivor of each kill exits with that save in flight, which can never commit: without `ftrain launch`
    # it waits supervisor.grace_seconds for it (30 s by default) before torchrun's SIGKILL; 2 s is plenty here.
    env = child_env(FTRAIN_FAULTS="kill@save.mid_write:step=20:rank=1,kill@save.before_manifest:step=30:rank=0",
                    FTRAIN_FAULTS_ONCE_DIR=str(once), FTRAIN_SUPERVISOR_GRACE_SECONDS="2")
    restored = []
    for attempt in range(3):
        proc = torchrun(EXAMPLE, run_args, env)
        restored += [int(m) for m in re.findall(r"\[ftrain r0\] INFO restored step (\d+)", proc.stderr)]
        assert not processes_mentioning(str(ckpt)), "processes of the job survived torchrun's exit"
        if attempt < 2:
            assert proc.returncode != 0, f"attempt {attempt} should have been killed:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert restored == [10, 20], restored
    assert final_hash(proc.stdout) == final_hash(ref.run.stdout)
    assert_same_tensors(checkpoint_tensors(ckpt), checkpoint_tensors(ref.ckpt))
    for rank in (0, 1):
        assert read_index_log(logs, rank) == read_index_log(ref.logs, rank)


def test_four_ranks_of_ddp_resume_bit_exact_without_ddp_warnings(tmp_path, ddp4_reference):
    # With more than 2 ranks, DDP's bucket rebuild after a resumed run's first iteration would make gloo add
    # gradients in another order than the original run did at that step: the example's communication hook
    # all-reduces each gradient on its own (docs/exactness.md), without find_unused_parameters'
    # warning from every rank.
    # The uninterrupted run is the shared one of this job (DDP4_JOB: the same steps and workers; it saves and
    # prints at other steps, which changes nothing trained).
    args = ["--steps", "32", "--save-every", "10", "--print-every", "0", "--workers", "0"]
    assert (args[:2], args[-2:]) == (DDP4_JOB[:2], DDP4_JOB[-2:])
    ref = ddp4_reference.run
    once = tmp_path / "once"
    once.mkdir()
    # Killed as the save of step 20 begins, which is after step 10's commit (one save in flight): resumes at 11.
    env = child_env(FTRAIN_FAULTS="kill@save.begin:step=20:rank=0", FTRAIN_FAULTS_ONCE_DIR=str(once))
    run_args = [*args, "--ckpt-dir", str(tmp_path / "ckpt")]
    killed = torchrun(EXAMPLE, run_args, env, nproc=4)
    assert killed.returncode != 0 and len(list(once.iterdir())) == 1, killed.stderr[-3000:]
    resumed = torchrun(EXAMPLE, run_args, env, nproc=4, check=True)
    assert "[ftrain r0] INFO restored step 10" in resumed.stderr, resumed.stderr[-3000:]
    assert final_hash(resumed.stdout) == final_hash(ref.stdout)
    assert all("find_unused_parameters" not in p.stderr for p in (ref, killed, resumed))


def test_a_save_failing_on_one_rank_fails_on_all_ranks_quickly(tmp_path):
    """Rank 1's background write fails: both ranks must raise (not wait for the commit timeout); step 10 stays valid."""
    ckpt = tmp_path / "ckpt"
    env = child_env(FTRAIN_FAULTS="raise@save.mid_write:step=20:rank=1")
    t0 = time.monotonic()
    proc = torchrun(EXAMPLE, ["--steps", "40", "--save-every", "10", "--print-every", "0", "--ckpt-dir", str(ckpt)],
                    env)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120, "a failed save must not wait for checkpoint.commit_timeout_seconds"
    # Rank 1's writer reports to rank 0 through the job's store at once; each rank names the failure.
    assert "ftrain: error: injected fault" in proc.stderr, proc.stderr[-3000:]
    assert "ftrain: error: rank 1 failed to write its shard of step 20" in proc.stderr, proc.stderr[-3000:]
    # lease.lock stays; lease.json too if torchrun killed rank 0 before it released it (docs/FORMAT.md, "Lease")
    left = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("lease.") and p.name not in ("events",
                                                                                                        "disk-id"))
    assert left == ["latest", "step-000000000010"]
    assert not processes_mentioning(str(ckpt))
