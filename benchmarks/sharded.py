"""FSDP2 checkpoint cost against DCP and the write floor, at 2 and 4 ranks and across world sizes.

    .venv/bin/python benchmarks/sharded.py [--mib 512] [--repeat 3]

State: a stack of square Linear layers sharded with FSDP2 (``fully_shard`` on a
CPU mesh, gloo) and AdamW's two moments, about --mib MiB in total over all
ranks (a third parameters, two thirds optimizer state). Three torchrun jobs:

1. 2 ranks: save with ftrain (async) and with ``dcp.async_save``, restore each
   at the same world size;
2. 4 ranks: the same, and restore the 2-rank checkpoints (a different world size);
3. 2 ranks: restore the 4-rank checkpoints.

Printed per row, rank 0's best of --repeat after a warm-up: blocking per save
(the time ``save()`` keeps training waiting) against ``dcp.async_save``'s;
persist (save start -> committed on every rank) against the write floor (each
rank writing and fsyncing its local bytes, all ranks at once, in the same job);
restore (everything into the registered model and optimizer) against
``dcp.load`` of the same state dict into the same DTensors.
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
from typing import Any, Callable

import torch
import torch.distributed as dist

import ftrain
from ftrain.config import CheckpointConfig, FtrainConfig, RetentionConfig


def build(mib: int, width: int = 1024) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, (mib << 20) // 3 // (width * width * 4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def train_one(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(4, model[0].weight.shape[1])
    model(x).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        if setup:
            setup()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def session(root: Path) -> ftrain.Session:
    return ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(root), retention=RetentionConfig(keep_last=0),
                                                                   on_resize="resume")))


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor of ``tree``, DTensors as their local shards."""
    if isinstance(tree, torch.Tensor):
        return [tree.to_local() if hasattr(tree, "to_local") else tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


def local_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    dist.init_process_group("gloo")
    logging.getLogger("ftrain").setLevel(logging.ERROR)  # the resize warnings are expected here
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.dir)
    model, opt = build(args.mib)
    train_one(model, opt)
    out: dict[str, float] = {}
    state = dcp_state(model, opt)
    nbytes = local_bytes(state)
    out["local bytes"] = nbytes
    out["total bytes"] = float(sum(dist_all_gather_int(nbytes)))

    if args.save:
        locals_ = [t for t in _tensors(state)]
        staging = [torch.empty_like(t) for t in locals_]
        out["memcpy floor"] = best(lambda: [d.copy_(t) for d, t in zip(staging, locals_)], args.repeat)
        del staging
        # Touched memory (untouched pages all read as the one zero page), written to a new file each time, like
        # a checkpoint; the previous one is deleted outside the timed region, like ftrain's below.
        data = torch.ones(nbytes, dtype=torch.uint8).numpy()
        floors = iter(range(10_000))

        def write_floor() -> None:
            with open(root / f"floor-{rank}-{next(floors)}", "wb") as f:
                f.write(data.data)
                f.flush()
                os.fsync(f.fileno())

        def clean_floor() -> None:
            for old in root.glob(f"floor-{rank}-*"):
                old.unlink()
        out["write floor"] = best(write_floor, args.repeat, clean_floor)
        clean_floor()

        pending: list[Any] = []
        target = root / f"dcp-{world}"
        # async_save's collectives run in its own thread: on the default group they would interleave with this
        # thread's barriers (a deadlock with gloo), so it gets a group of its own.
        dcp_group = dist.new_group(backend="gloo")

        def dcp_setup() -> None:
            while pending:
                pending.pop().result()
            if rank == 0:
                shutil.rmtree(target, ignore_errors=True)
        out["dcp.async_save block"] = best(lambda: pending.append(dcp.async_save(state, checkpoint_id=str(target),
                                                                                       process_group=dcp_group)),
                                           args.repeat, dcp_setup)
        while pending:
            pending.pop().result()
        dist.barrier()

        s = session(root / f"ftrain-{world}")
        s.register(model=model, optimizer=opt)
        s.restore()
        steps = iter(range(1, 10_000))
        blocking, persist = [], []
        for _ in range(args.repeat + 1):
            if rank == 0:  # retention off, deletions outside the timed region (as for the floor)
                for old in sorted((root / f"ftrain-{world}").glob("step-*"))[:-1]:
                    shutil.rmtree(old)
            dist.barrier()
            t0 = time.perf_counter()
            s.save(next(steps))
            blocking.append(time.perf_counter() - t0)
            s._checkpointer.wait()
            dist.barrier()
            persist.append(time.perf_counter() - t0)
        out["ftrain save block"] = min(blocking[1:])
        out["ftrain persist"] = min(persist[1:])
        s.close()

    for saved in args.restore_from:
        src_ftrain, src_dcp = root / f"ftrain-{saved}", root / f"dcp-{saved}"
        model2, opt2 = build(args.mib)  # a fresh job: model built, optimizer without state

        opened: list[ftrain.Session] = []

        def restore() -> None:
            r = session(src_ftrain)
            opened.append(r)
            r.register(model=model2, optimizer=opt2)
            assert r.restore() > 0

        def close() -> None:
            while opened:
                opened.pop().close()
        out[f"ftrain restore from {saved}"] = best(restore, args.repeat, close)
        close()

        model3, opt3 = build(args.mib)

        def dcp_restore() -> None:
            sd = dcp_state(model3, opt3)
            dcp.load(sd, checkpoint_id=str(src_dcp))
            set_state_dict(model3, opt3, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        out[f"dcp.load from {saved}"] = best(dcp_restore, args.repeat)
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def dist_all_gather_int(n: int) -> list[int]:
    got = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(got, torch.tensor(n, dtype=torch.int64))
    return [int(g) for g in got]


def run(n: int, root: Path, args: argparse.Namespace, *, save: bool, restore_from: list[int]) -> dict[str, float]:
    out = root / f"out-{n}-{int(save)}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", __file__, "--worker", "--mib", str(args.mib), "--repeat",
           str(args.repeat), "--dir", str(root), "--out", str(out), "--restore-from", *map(str, restore_from)]
    if save:
        cmd.append("--save")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--restore-from", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ftrain-sharded-"))
    root.mkdir(parents=True, exist_ok=True)
    r2 = run(2, root, args, save=True, restore_from=[2])
    r4 = run(4, root, args, save=True, restore_from=[4, 2])
    r2b = run(2, root, args, save=False, restore_from=[4])
    print(f"FSDP2 state {r2['total bytes'] / 2**20:.0f} MiB in total (parameters + AdamW), best of {args.repeat}, "
          f"torch {torch.__version__}")
    print(f"{'ranks':>5} {'what':<44} {'seconds':>8}   ratio")
    for n, r in ((2, r2), (4, r4)):
        block, dblock = r["ftrain save block"], r["dcp.async_save block"]
        print(f"{n:>5} {'ftrain save, blocking':<44} {block:>8.3f}   {dblock / block:.1f}x less than "
              f"dcp.async_save ({dblock:.3f} s); {block / r['memcpy floor']:.1f}x the memcpy floor "
              f"({r['memcpy floor']:.3f} s)")
        print(f"{n:>5} {'ftrain persist (save -> committed)':<44} {r['ftrain persist']:>8.3f}   "
              f"{r['ftrain persist'] / r['write floor']:.2f}x the write floor ({r['write floor']:.3f} s, "
              f"{r['local bytes'] / 2**20:.0f} MiB per rank)")
    for n, saved, r in ((2, 2, r2), (4, 4, r4), (4, 2, r4), (2, 4, r2b)):
        ft, dl = r[f"ftrain restore from {saved}"], r[f"dcp.load from {saved}"]
        print(f"{n:>5} {f'ftrain restore of a {saved}-rank checkpoint':<44} {ft:>8.3f}   {ft / dl:.2f}x dcp.load "
              f"({dl:.3f} s)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
