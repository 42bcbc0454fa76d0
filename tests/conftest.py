"""Shared helpers: run the example as a real subprocess, parse its output, check for orphans."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train.py"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def final_hash(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("final_state_sha256=")]
    assert len(lines) == 1, f"expected one final_state_sha256 line, got {lines}:\n{output[-3000:]}"
    return lines[0].split("=", 1)[1]


def run_example(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"example failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_index_log(path: Path) -> dict[int, list[int]]:
    """step -> sample indices, checking that a step replayed after a resume consumed the same samples."""
    steps: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        step, *idx = map(int, line.split())
        if step in steps:
            assert steps[step] == idx, f"step {step} replayed with different samples: {steps[step]} vs {idx}"
        steps[step] = idx
    return steps


def checkpoint_tensors(root: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of the newest checkpoint in ``root`` (all ranks), read and verified by ftrain's own reader."""
    from ftrain.checkpoint.format import step_dirname
    from ftrain.checkpoint.shard import read_shard_tensors
    from ftrain.checkpoint.store import CheckpointStore

    store = CheckpointStore(root)
    step = store.steps()[-1]
    manifest = store.validate(step)
    tensors = {}
    for rank in range(manifest.world_size):
        tensors.update(read_shard_tensors(store.storage, step_dirname(step), manifest, rank))
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"tensor {name} differs"


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"
