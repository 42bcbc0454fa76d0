"""Checkpoint cost against floors measured in the same run, at 1 and N ranks.

    .venv/bin/python benchmarks/checkpoint.py [--mib 512] [--ranks 1 4] [--repeat 3] [--train-seconds 30]
                                              [--only-training]

State: a model-like dict of float32 tensors totalling --mib MiB, identical on
every rank (as under DDP). Every timing is the best of --repeat after a warm-up
save, i.e. steady state. Printed with ratios against:

* memcpy floor: a warm copy of the same bytes into a preallocated buffer;
* write floor: writing the same bytes to one file and fsyncing it (1 rank).

Rows: blocking time per save of torch.save(+fsync), dcp.save, dcp.async_save
and ftrain (async: training blocks only for the snapshot); ftrain's persist
throughput (snapshot start -> committed) against the write floor; restore
against torch.load. Then the step-time overhead of a training loop saving
every 10 s against no saves, with ftrain async saves.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import ftrain
from ftrain.config import CheckpointConfig, FtrainConfig, RetentionConfig


class Holder(torch.nn.Module):
    """The state as a module's buffers (stands in for a model: restore reads into its tensors in place)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k.replace(".", "_"), v)


def make_state(mib: int) -> dict[str, torch.Tensor]:
    n = 16
    per = (mib << 20) // 4 // n
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat + 1):  # the first run warms up (allocations, page cache)
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def session(root: Path, keep_last: int = 2) -> ftrain.Session:
    return ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(root), retention=RetentionConfig(keep_last=keep_last))))


def measure_saves(mib: int, repeat: int, root: Path) -> dict[str, float]:
    """Runs on every rank (under torchrun) or alone; returns rank 0's numbers."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = make_state(mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    out: dict[str, float] = {"bytes": nbytes}
    staging = {k: torch.empty_like(v) for k, v in state.items()}
    out["memcpy"] = best(lambda: [staging[k].copy_(v) for k, v in state.items()], repeat)

    import torch.distributed.checkpoint as dcp
    dcp_dir = root / "dcp"

    def clean_dcp() -> None:
        if rank == 0:
            shutil.rmtree(dcp_dir, ignore_errors=True)
        barrier()
    out["dcp.save"] = best(lambda: (dcp.save(state, checkpoint_id=str(dcp_dir)), barrier()), repeat, clean_dcp)
    pending: list = []

    def dcp_async() -> None:
        pending.append(dcp.async_save(state, checkpoint_id=str(dcp_dir)))

    def dcp_async_setup() -> None:
        while pending:
            pending.pop().result()
        clean_dcp()
    out["dcp.async_save"] = best(dcp_async, repeat, dcp_async_setup)
    dcp_async_setup()

    holder = Holder(state)
    # keep_last=0 and deletions outside the timed region: persist is measured without retention's unlinks,
    # which docs/PERFORMANCE.md reports separately.
    s = session(root / "ftrain", keep_last=0)
    s.register(model=holder)
    s.restore()
    steps = iter(range(1, 10_000))
    blocking, persist = [], []
    for _ in range(repeat + 1):
        if rank == 0:
            for old in sorted((root / "ftrain").glob("step-*"))[:-1]:
                shutil.rmtree(old)
        barrier()
        t0 = time.perf_counter()
        s.save(next(steps))
        blocking.append(time.perf_counter() - t0)
        s.close()  # wait for persist + commit
        barrier()
        persist.append(time.perf_counter() - t0)
    out["ftrain.save (async)"] = min(blocking[1:])
    out["ftrain persist+commit"] = min(persist[1:])

    opened: list[ftrain.Session] = []

    def restore() -> None:
        r = session(root / "ftrain")
        opened.append(r)
        r.register(model=Holder(staging))
        r.restore()

    def close_opened() -> None:  # outside the timed region
        while opened:
            opened.pop().close()
    out["ftrain restore"] = best(restore, repeat, close_opened)
    close_opened()
    s.close()
    return out


def single_process_floors(mib: int, repeat: int, root: Path) -> dict[str, float]:
    state = make_state(mib)
    raw = root / "raw.bin"

    def raw_write() -> None:
        with open(raw, "wb", buffering=0) as f:
            for v in state.values():
                f.write(memoryview(v.view(torch.uint8).numpy()))
            os.fsync(f.fileno())
    out = {"write+fsync": best(raw_write, repeat)}
    pt = root / "state.pt"

    def torch_save() -> None:
        torch.save(state, pt)
        fd = os.open(pt, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    out["torch.save+fsync"] = best(torch_save, repeat)
    out["torch.load"] = best(lambda: torch.load(pt, weights_only=True), repeat)
    model = {k: torch.empty_like(v) for k, v in state.items()}
    out["torch.load+copy"] = best(lambda: [model[k].copy_(v) for k, v in torch.load(pt, weights_only=True).items()],
                                  repeat)
    raw.unlink()
    pt.unlink()
    return out


def model_and_adamw(mib: int, repeat: int, root: Path) -> dict[str, float]:
    """A real model with AdamW after one step (a third parameters, two thirds optimizer moments): what a resumed
    job restores. torch.load of torch.save({model, optimizer}) against ftrain's restore into a freshly built model
    and an optimizer without state (the parameters are read in place, the moments into fresh tensors)."""
    width = 1024
    layers = max(1, (mib << 20) // 3 // (width * width * 4))

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, opt = build()
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    pt = root / "model-adamw.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt)
    s = session(root / "model-adamw")
    s.register(model=model, optimizer=opt)
    s.restore()
    s.save(1, blocking=True)
    s.close()
    out = {"torch.load": best(lambda: torch.load(pt, weights_only=True), repeat)}
    opened: list[ftrain.Session] = []

    def restore() -> None:
        m, o = build()
        r = session(root / "model-adamw")
        opened.append(r)
        r.register(model=m, optimizer=o)
        r.restore()

    def close() -> None:
        while opened:
            opened.pop().close()
    out["ftrain restore"] = best(restore, repeat, close) - best(build, repeat)  # less building the model
    close()
    out["bytes"] = pt.stat().st_size
    pt.unlink()
    shutil.rmtree(root / "model-adamw")
    return out


def training_overhead(seconds: float, root: Path) -> dict[str, float]:
    """Steps/s of a CPU training loop (~100 MiB of model+AdamW state) with no saves vs a save every 10 s."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 2048),
                                torch.nn.GELU(), torch.nn.Linear(2048, 1024))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 1024)

    def run(save_every: float) -> float:
        s = session(root / f"train-{save_every}")
        s.register(model=model, optimizer=opt)
        s.restore()
        steps, t0, last = 0, time.perf_counter(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if save_every and time.perf_counter() - last >= save_every:
                s.save(steps)
                last = time.perf_counter()
        s.close()
        return steps / (time.perf_counter() - t0)
    run(0)  # warm-up: allocations, optimizer state
    # Alternate the two settings and take medians: on a small shared machine drift between runs is larger
    # than the effect being measured.
    base, with_saves = [], []
    for _ in range(3):
        base.append(run(0))
        with_saves.append(run(10.0))
    return {"steps/s, no saves": sorted(base)[1], "steps/s, save every 10 s": sorted(with_saves)[1]}


def worker_main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    logging.getLogger("ftrain").setLevel(logging.WARNING)
    out = measure_saves(args.mib, args.repeat, Path(args.dir))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train-seconds", type=float, default=30.0)
    p.add_argument("--dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--only-training", action="store_true", help="only the step-time overhead measurement")
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.only_training:
        args.ranks = []
    logging.getLogger("ftrain").setLevel(logging.WARNING)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ftrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    floors = single_process_floors(args.mib, args.repeat, root) if args.ranks else {}
    results: dict[int, dict[str, float]] = {}
    for n in args.ranks:
        out = root / f"out-{n}.json"
        work = root / f"r{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "127.0.0.1:0", __file__, "--worker", "--mib", str(args.mib), "--repeat",
               str(args.repeat), "--dir", str(work), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        results[n] = json.loads(out.read_text())
        shutil.rmtree(work, ignore_errors=True)
    nbytes = results[args.ranks[0]]["bytes"] if args.ranks else 0
    if args.ranks:
        print_table(args, floors, results, nbytes)
        real = model_and_adamw(args.mib, args.repeat, root)
        print(f"    1 model + AdamW ({real['bytes'] / 2**20:.0f} MiB): ftrain restore {real['ftrain restore']:.3f}s vs "
              f"torch.load {real['torch.load']:.3f}s = {real['ftrain restore'] / real['torch.load']:.2f}x")
    if args.train_seconds > 0:
        t = training_overhead(args.train_seconds, root)
        base, saving = t["steps/s, no saves"], t["steps/s, save every 10 s"]
        print(f"training throughput with a save every 10 s: {saving:.2f} vs {base:.2f} steps/s without = "
              f"{saving / base:.3f}x (medians of 3 alternating {args.train_seconds:.0f} s runs)")
    shutil.rmtree(root, ignore_errors=True)


def print_table(args: argparse.Namespace, floors: dict[str, float], results: dict[int, dict[str, float]],
                nbytes: float) -> None:
    print(f"state {nbytes / 2**20:.0f} MiB per rank (replicated), best of {args.repeat}, torch {torch.__version__}")
    print(f"floors (1 process): write+fsync {floors['write+fsync']:.3f}s "
          f"({nbytes / floors['write+fsync'] / 1e9:.2f} GB/s), torch.save+fsync {floors['torch.save+fsync']:.3f}s, "
          f"torch.load {floors['torch.load']:.3f}s, torch.load+copy {floors['torch.load+copy']:.3f}s")
    print(f"{'ranks':>5} {'what':<24} {'seconds':>8} {'x memcpy':>9} {'x write':>8}")
    for n, r in results.items():
        rows = [("memcpy floor", r["memcpy"]), ("torch.save+fsync", floors["torch.save+fsync"] if n == 1 else None),
                ("dcp.save", r["dcp.save"]), ("dcp.async_save (block)", r["dcp.async_save"]),
                ("ftrain save (block)", r["ftrain.save (async)"]), ("ftrain persist+commit", r["ftrain persist+commit"])]
        for name, t in rows:
            if t is None:
                continue
            print(f"{n:>5} {name:<24} {t:>8.3f} {t / r['memcpy']:>8.2f}x {t / floors['write+fsync']:>7.2f}x")
        print(f"{n:>5} {'ftrain restore':<24} {r['ftrain restore']:>8.3f}   vs torch.load "
              f"{r['ftrain restore'] / floors['torch.load']:.2f}x, vs torch.load + copy into the model "
              f"{r['ftrain restore'] / floors['torch.load+copy']:.2f}x")
        print(f"{n:>5} ftrain blocking vs dcp.async_save: {r['dcp.async_save'] / r['ftrain.save (async)']:.1f}x less; "
              f"persist throughput {nbytes / r['ftrain persist+commit'] / 1e9:.2f} GB/s = "
              f"{floors['write+fsync'] / r['ftrain persist+commit']:.2f}x the write floor")


if __name__ == "__main__":
    main()
