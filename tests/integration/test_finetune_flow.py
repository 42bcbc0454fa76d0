"""Fine-tuning and model selection with real processes and real kills (examples/finetune.py).

1. Pretrain under DDP (2 ranks) and export: the exported weights equal the DDP model's own state_dict.
2. Fine-tune from the ``module.``-prefixed DDP state_dict into a model with a new head, backbone partly
   frozen, early stopping and keep-best on: uninterrupted, then under ``ftrain launch`` with SIGKILLs of
   random ranks at random steps and inside a save. Same stop step, bit-identical final state.
3. The same with trainable-only checkpoints in one process, killed at random steps and inside saves by the
   fault injector: the same stop step, final state, and the same checkpoints left on disk; then a resume on
   a different base is refused with a clear error.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftrain.checkpoint.store import CheckpointStore

from helpers import ROOT, Launch, assert_no_orphans, child_env, final_hash, launch_env, torchrun

pytestmark = pytest.mark.slow

FINETUNE = ROOT / "examples" / "finetune.py"
MAX_STEPS = 150


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FINETUNE), *args], env=env, capture_output=True, text=True,
                          timeout=180)


def stopped_at(output: str) -> int:
    (step,) = re.findall(r"^stopped_at=(\d+)$", output, re.M)
    return int(step)


def seed() -> int:
    return int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pretrain")
    torchrun(FINETUNE, ["--phase", "pretrain", "--steps", "30", "--ckpt-dir", str(d / "ckpt"), "--export",
                        str(d / "ddp.pt"), "--print-every", "0"], timeout=240, check=True)
    return d


def test_export_of_a_ddp_checkpoint_equals_the_ddp_state_dict(pretrained: Path) -> None:
    from safetensors.torch import load_file

    out = pretrained / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "export", str(pretrained / "ckpt"), "--format",
                           "safetensors", str(out)], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    exported = load_file(out)
    ddp = torch.load(pretrained / "ddp.pt", weights_only=True)
    assert sorted(f"module.{k}" for k in exported) == sorted(ddp)
    for k, v in exported.items():
        assert torch.equal(v, ddp[f"module.{k}"]), k


def test_ddp_finetune_with_early_stopping_killed_and_resumed_is_bit_identical(pretrained: Path,
                                                                               tmp_path: Path) -> None:
    args = ["--phase", "finetune", "--pretrained", str(pretrained / "ddp.pt"), "--steps", str(MAX_STEPS),
            "--print-every", "1"]
    ref = torchrun(FINETUNE, [*args, "--ckpt-dir", str(tmp_path / "ref")], timeout=240, check=True)
    # The DDP prefix was stripped, the backbone loaded and the new head skipped, with a report.
    assert "stripped prefix 'module.'" in ref.stdout and "4 loaded" in ref.stdout, ref.stdout[:2000]
    assert "head.weight: source [4, 64] vs model [3, 64]" in ref.stdout
    stop = stopped_at(ref.stdout)
    assert 40 < stop < MAX_STEPS, f"early stopping should fire mid-run, stopped at {stop}"
    assert "early stopping at step" in ref.stderr

    s = seed()
    rng = random.Random(s)
    faults = [f"kill@step:step={rng.randint(6, 18)}:rank={rng.randrange(2)}",
              f"kill@save.mid_write:step=30:rank={rng.randrange(2)}",
              f"kill@step:step={rng.randint(34, stop - 2)}:rank={rng.randrange(2)}"]
    once = tmp_path / "once"
    once.mkdir()
    env = launch_env(FTRAIN_FAULTS=",".join(faults), FTRAIN_FAULTS_ONCE_DIR=str(once))
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--save-every-steps", "10",
                  "--max-restarts", "5", "--rdzv-id", "finetune", str(FINETUNE), *args], env)
    rc = run.wait()
    info = f"seed {s}, faults {faults}:\n{run.output[-5000:]}"
    assert rc == 0, info
    assert len(list(once.iterdir())) == 3, info
    assert stopped_at(run.output) == stop, info
    assert final_hash(run.output) == final_hash(ref.stdout), info
    assert_no_orphans("finetune")


def saved_steps(stderr: str) -> list[int]:
    return sorted({int(m) for m in re.findall(r"saved step (\d+)", stderr)})


def test_trainable_only_early_stopping_under_sigkill_and_a_different_base(pretrained: Path, tmp_path: Path) -> None:
    args = ["--phase", "finetune", "--pretrained", str(pretrained / "ddp.pt"), "--steps", str(MAX_STEPS),
            "--trainable-only", "--keep-best", "2", "--print-every", "0"]
    env = child_env(FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST="2")
    ref = run_script([*args, "--ckpt-dir", str(tmp_path / "ref")], env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    stop, saved = stopped_at(ref.stdout), saved_steps(ref.stderr)
    assert 40 < stop < MAX_STEPS and len(saved) >= 4, (stop, saved)

    s = seed()
    rng = random.Random(s)
    in_save = rng.sample([x for x in saved if 5 <= x < stop], 2)
    faults = [f"kill@step:step={rng.randint(3, stop - 1)}", f"kill@save.mid_write:step={in_save[0]}",
              f"kill@save.before_latest:step={in_save[1]}"]
    once = tmp_path / "once"
    once.mkdir()
    chaos_env = {**env, "FTRAIN_FAULTS": ",".join(faults), "FTRAIN_FAULTS_ONCE_DIR": str(once)}
    ckpt = tmp_path / "ckpt"
    for attempt in range(6):
        proc = run_script([*args, "--ckpt-dir", str(ckpt)], chaos_env)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, f"seed {s}, {faults}: attempt {attempt} failed:\n{proc.stderr[-3000:]}"
    info = f"seed {s}, faults {faults}"
    assert proc.returncode == 0 and len(list(once.iterdir())) == 3, info
    assert stopped_at(proc.stdout) == stop, info
    assert final_hash(proc.stdout) == final_hash(ref.stdout), info
    # Keep-best and keep-last left exactly the same checkpoints, with the same metrics and selection state.
    ref_store, store = CheckpointStore(tmp_path / "ref"), CheckpointStore(ckpt)
    assert [st for st, _ in store.step_dirs()] == [st for st, _ in ref_store.step_dirs()], info
    assert store.best_hint() == ref_store.best_hint()
    for step, _ in ref_store.step_dirs():
        a, b = ref_store.validate(step).meta, store.validate(step).meta
        assert a["trainable_only"] and a["omitted"]["model"] == ["backbone.0.bias", "backbone.0.weight"]
        for key in ("metrics", "selection", "best_steps", "base_fingerprint"):
            assert a[key] == b[key], f"{info}: {key} of step {step}"

    # The same checkpoints on top of another base (the pretrained weights, perturbed) are refused.
    ddp = torch.load(pretrained / "ddp.pt", weights_only=True)
    ddp["module.backbone.0.weight"] += 1e-3
    torch.save(ddp, tmp_path / "other.pt")
    other = run_script([*args[:2], "--pretrained", str(tmp_path / "other.pt"), *args[4:], "--ckpt-dir", str(ckpt)],
                       env)
    assert other.returncode == 1, other.stderr[-3000:]
    assert "base model fingerprint mismatch" in other.stderr and "Traceback" not in other.stderr, other.stderr[-3000:]
