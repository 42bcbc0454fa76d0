"""BatchNorm under DDP: checkpoints hold rank 0's buffers, so a SIGKILLed run resumes bit-exact (issue 11).

Between steps the ranks' running statistics differ (each rank updates them from
its own batch; DDP broadcasts rank 0's at the next forward). A checkpoint that
took some buffers from rank 1 would match no rank, and the resumed run would
drift from the uninterrupted one. Also: ``checkpoint.check_replicated`` names a
replicated parameter that silently diverged on one rank.
"""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint.format import step_dirname
from ftrain.checkpoint.shard import read_shard_tensors
from ftrain.checkpoint.store import CheckpointStore

from helpers import assert_same_tensors, checkpoint_tensors, child_env, final_hash, torchrun

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "batchnorm_train.py"
STEPS, EVERY = 30, 5
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def args(ckpt: Path, logs: Path) -> list[str]:
    return ["--steps", str(STEPS), "--save-every", str(EVERY), "--ckpt-dir", str(ckpt), "--buffer-log", str(logs)]


def buffer_log(path: Path) -> dict[int, str]:
    """step -> hash of the rank's buffers when that step's save was taken; a replayed step must log the same."""
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, digest = line.split()
        assert out.setdefault(int(step), digest) == digest, f"step {step} replayed with different buffers"
    return out


def saved_buffers_hash(root: Path, step: int) -> str:
    """The checkpoint's BatchNorm buffers of ``step``, hashed as the script hashes a rank's (named_buffers order)."""
    store = CheckpointStore(root)
    manifest = store.validate(step)
    tensors: dict[str, torch.Tensor] = {}
    for rank in range(manifest.world_size):
        tensors.update(read_shard_tensors(store.storage, step_dirname(step), manifest, rank))
    prefix = "replicated/model/"
    buffers = {f"{layer}.{b}": tensors[f"{prefix}{layer}.{b}"] for layer in (1, 4) for b in BUFFERS}
    return ftrain.state_sha256([("buffers", buffers)])


def test_sigkilled_ddp_batchnorm_run_resumes_bit_exact_with_rank_0_buffers(tmp_path: Path) -> None:
    ref_ckpt, ref_logs = tmp_path / "ref", tmp_path / "ref-logs"
    ref = torchrun(SCRIPT, args(ref_ckpt, ref_logs), child_env(FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST="0"), check=True)
    rank0, rank1 = buffer_log(ref_logs / "rank0.txt"), buffer_log(ref_logs / "rank1.txt")
    saves = list(range(EVERY, STEPS + 1, EVERY))
    assert sorted(rank0) == sorted(rank1) == saves
    # The premise: the ranks' buffers differ at every save (else this test could not tell whose were written) ...
    assert all(rank0[s] != rank1[s] for s in saves)
    # ... and every checkpoint holds exactly rank 0's.
    for s in saves:
        assert saved_buffers_hash(ref_ckpt, s) == rank0[s], f"step {s}: checkpoint buffers are not rank 0's"

    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    # From 2 * EVERY + 1: a rank passes step 2 * EVERY's save only once the save of EVERY has committed.
    kill_at = random.Random(seed).randint(2 * EVERY + 1, STEPS - 1)
    ckpt, logs, once = tmp_path / "ckpt", tmp_path / "logs", tmp_path / "once"
    once.mkdir()
    env = child_env(FTRAIN_FAULTS=f"kill@step:step={kill_at}:rank=1", FTRAIN_FAULTS_ONCE_DIR=str(once))
    killed = torchrun(SCRIPT, args(ckpt, logs), env)
    assert killed.returncode != 0 and list(once.iterdir()), f"seed {seed}: rank 1 was not killed at {kill_at}"
    resumed = torchrun(SCRIPT, args(ckpt, logs), env, check=True)
    restored = [int(m) for m in re.findall(r"\[ftrain r0\] INFO restored step (\d+)", resumed.stderr)]
    # The newest save before the kill, or the one before it if the kill beat its background write.
    newest = (kill_at - 1) // EVERY * EVERY
    assert len(restored) == 1 and restored[0] in (newest, newest - EVERY), (seed, kill_at, restored)
    assert final_hash(resumed.stdout) == final_hash(ref.stdout), f"seed {seed}, killed at {kill_at}: state differs"
    # The full final checkpoints, every BatchNorm buffer included, tensor by tensor.
    final, expected = checkpoint_tensors(ckpt), checkpoint_tensors(ref_ckpt)
    assert {f"replicated/model/{layer}.{b}" for layer in (1, 4) for b in BUFFERS} <= final.keys()
    assert_same_tensors(final, expected)
    assert buffer_log(logs / "rank0.txt") == rank0  # replayed saves saw the same buffers


def test_check_replicated_names_a_parameter_that_diverged_on_one_rank(tmp_path: Path) -> None:
    env = child_env(BN_DIVERGE_AT="7", FTRAIN_CHECKPOINT_CHECK_REPLICATED="true")
    proc = torchrun(SCRIPT, args(tmp_path / "ckpt", tmp_path / "logs"), env)
    assert proc.returncode != 0
    # Step 5 is still replicated and saved; at step 10 both ranks refuse, naming the tensor (buffers differ too,
    # by design, and are not reported).
    message = "StateMismatch: checkpoint step 10: replicated tensor 'replicated/model/3.weight' differs between ranks"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert CheckpointStore(tmp_path / "ckpt").steps() == [5]
