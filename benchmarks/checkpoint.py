"""Checkpoint save/restore cost against floors measured in the same run (one process).

    .venv/bin/python benchmarks/checkpoint.py [--mib 512] [--repeat 3] [--dir /tmp/ftrain-bench]

State: a model-like dict of float32 tensors totalling --mib MiB. Every number is
the best of --repeat runs after one warm-up; ratios are against the floors:

* memcpy: a warm copy of the same bytes into a preallocated buffer;
* write+fsync: writing the same bytes to one file and fsyncing it.

Compared: torch.save(+fsync), torch.distributed.checkpoint.save, ftrain's
synchronous Session.save, and for restore torch.load(weights_only=True) against
ftrain's Session.restore (which also verifies every checksum). Page cache is warm
for reads (dropping it needs privileges CI does not have).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import ftrain
from ftrain.config import CheckpointConfig, FtrainConfig


class Holder:
    """A Stateful around a plain dict of tensors (stands in for a model)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.tensors[k].copy_(v)


def make_state(mib: int) -> dict[str, torch.Tensor]:
    n_layers = 16
    per = (mib << 20) // 4 // n_layers
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n_layers)}


def best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ftrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    state = make_state(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    rows: list[tuple[str, float, str]] = []

    staging = {k: torch.empty_like(v) for k, v in state.items()}
    memcpy = best(lambda: [staging[k].copy_(v) for k, v in state.items()], args.repeat)
    rows.append(("memcpy (floor)", memcpy, "memcpy"))

    raw = root / "raw.bin"

    def raw_write() -> None:
        with open(raw, "wb", buffering=0) as f:
            for v in state.values():
                f.write(memoryview(v.view(torch.uint8).numpy()))
            os.fsync(f.fileno())
    write_floor = best(raw_write, args.repeat)
    rows.append(("write+fsync (floor)", write_floor, "write"))

    pt = root / "state.pt"

    def torch_save() -> None:
        torch.save(state, pt)
        fsync_path(pt)
    rows.append(("torch.save+fsync", best(torch_save, args.repeat), "write"))

    import torch.distributed.checkpoint as dcp
    dcp_dir = root / "dcp"
    rows.append(("dcp.save", best(lambda: dcp.save(state, checkpoint_id=str(dcp_dir)), args.repeat,
                                  setup=lambda: shutil.rmtree(dcp_dir, ignore_errors=True)), "write"))

    holder = Holder(state)
    ck = root / "ftrain"
    shutil.rmtree(ck, ignore_errors=True)
    session = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(ck), keep_last=2)))
    session.register(model=holder)
    session.restore()
    step = iter(range(1, 1000))
    rows.append(("ftrain save (sync)", best(lambda: session.save(next(step)), args.repeat), "write"))

    load_floor = best(lambda: torch.load(pt, weights_only=True), args.repeat)
    rows.append(("torch.load", load_floor, "load"))

    def ftrain_restore() -> None:
        s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(ck))))
        s.register(model=Holder(staging))
        s.restore()
    rows.append(("ftrain restore+verify", best(ftrain_restore, args.repeat), "load"))

    floors = {"memcpy": memcpy, "write": write_floor, "load": load_floor}
    print(f"state {nbytes / 2**20:.0f} MiB, 1 process, best of {args.repeat}; torch {torch.__version__}")
    print(f"{'what':<24} {'seconds':>8} {'GB/s':>7} {'vs floor':>10}")
    for name, t, kind in rows:
        print(f"{name:<24} {t:>8.3f} {nbytes / t / 1e9:>7.2f} {t / floors[kind]:>8.2f}x {kind}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import logging
    logging.getLogger("ftrain").setLevel(logging.WARNING)
    main()
