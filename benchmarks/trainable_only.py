"""Trainable-only checkpoints against full ones, for a LoRA-style fine-tune (one process).

    .venv/bin/python benchmarks/trainable_only.py [--width 2048] [--layers 16] [--rank 8] [--repeat 3]

Model: ``--layers`` frozen ``Linear(width, width)`` layers (the base: 16 x 2048^2 x 4 B = 256 MiB by
default) with a trainable low-rank adapter pair per layer (rank 8: 0.8% of the base), AdamW on the
adapters only. Both runs take the same steps; each save is timed at steady state (best of --repeat after
a first save that allocates buffers). Trainable-only hashes the frozen base once per run, in ``restore()``.

Printed, with ratios trainable-only / full:

* bytes on disk per checkpoint;
* training blocked per save (async: the snapshot into host buffers);
* save to commit (``session.save(blocking=True)``: snapshot, write, fsync, checksum, manifest);
* restore into a fresh model (trainable-only also re-hashes the base to check its fingerprint);

and the floors of the same run: memcpy and write+fsync of the *full* state's bytes, torch.save+fsync of
the full and of the adapter-only state dicts.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ftrain  # noqa: E402
from ftrain.config import CheckpointConfig, FtrainConfig, RetentionConfig  # noqa: E402
from ftrain.finetune import freeze  # noqa: E402


class LoRANet(nn.Module):
    def __init__(self, width: int, layers: int, rank: int) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for base, down, up in zip(self.base, self.down, self.up):
            x = torch.tanh(base(x) + up(down(x)))
        return x


def build(args: argparse.Namespace) -> tuple[LoRANet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = LoRANet(args.width, args.layers, args.rank)
    freeze(model, "base.*")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(torch.randn(4, args.width)).pow(2).mean()  # one step, so AdamW has its moments
    loss.backward()
    opt.step()
    return model, opt


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def measure(args: argparse.Namespace, root: Path, trainable_only: bool) -> dict[str, float]:
    model, opt = build(args)
    config = FtrainConfig(checkpoint=CheckpointConfig(dir=str(root), retention=RetentionConfig(keep_last=2),
                                                      trainable_only=trainable_only))
    session = ftrain.Session(config)
    session.register(model=model, optimizer=opt)
    t0 = time.perf_counter()
    session.restore()  # an empty directory: trainable-only hashes the frozen base here, once per run
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    session.save(1, blocking=True)
    first = time.perf_counter() - t0
    blocked, commit = [], []
    for step in range(2, args.repeat + 2):
        session.save(step)  # asynchronous: returns after the snapshot
        blocked.append(session._checkpointer.last_blocking_seconds)
        session.close()
    for step in range(args.repeat + 2, 2 * args.repeat + 2):
        t0 = time.perf_counter()
        session.save(step, blocking=True)
        commit.append(time.perf_counter() - t0)
    last = step
    size = dir_bytes(session._store.path(last))
    session.close()
    fresh, fresh_opt = build(args)  # the same base weights (seeded), as a fine-tune reloads them from their source
    restorer = ftrain.Session(config)
    restorer.register(model=fresh, optimizer=fresh_opt)
    t0 = time.perf_counter()
    assert restorer.restore() == last
    restore = time.perf_counter() - t0
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    restorer.close()
    return {"bytes": size, "start": start, "first save": first, "blocked": min(blocked), "commit": min(commit), "restore": restore}


def floors(args: argparse.Namespace, root: Path) -> dict[str, float]:
    model, opt = build(args)
    full = {**{f"model/{k}": v for k, v in model.state_dict().items()}}
    full.update({f"opt/{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()})
    adapters = {k: v for k, v in full.items() if ".base." not in k and not k.startswith("model/base.")}
    total = sum(v.numel() * v.element_size() for v in full.values())
    dst = torch.empty(total, dtype=torch.uint8)

    def memcpy() -> None:
        off = 0
        for v in full.values():
            n = v.numel() * v.element_size()
            dst[off:off + n].copy_(v.reshape(-1).view(torch.uint8))
            off += n

    def write_fsync() -> None:
        with open(root / "raw.bin", "wb", buffering=0) as f:
            for v in full.values():
                f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
            os.fsync(f.fileno())

    def torch_save(state: dict[str, torch.Tensor]) -> None:
        torch.save(state, root / "state.pt")
        fd = os.open(root / "state.pt", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return {"full bytes": total, "memcpy (full)": best(memcpy), "write+fsync (full)": best(write_fsync),
            "torch.save+fsync (full)": best(lambda: torch_save(full)),
            "torch.save+fsync (adapters)": best(lambda: torch_save(adapters))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    logging.getLogger("ftrain").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ftrain-bench-lora-", dir=os.environ.get("FTRAIN_BENCH_DIR")))
    try:
        model, _ = build(args)
        base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA-style model: base {base * 4 / 2**20:.0f} MiB frozen, adapters {trainable * 4 / 2**20:.2f} MiB "
              f"trainable ({100 * trainable / base:.2f}% of the base), AdamW on the adapters; best of {args.repeat}")
        fl = floors(args, root)
        full = measure(args, root / "full", False)
        only = measure(args, root / "trainable", True)
        print(f"{'':<34}{'full':>12}{'trainable-only':>16}{'ratio':>9}")
        print(f"{'bytes per checkpoint':<34}{full['bytes'] / 2**20:>10.2f} M{only['bytes'] / 2**20:>14.3f} M"
              f"{only['bytes'] / full['bytes']:>9.4f}")
        for key, label in (("blocked", "training blocked per save (s)"), ("commit", "save to commit (s)"),
                           ("first save", "first save, incl. setup (s)"), ("start", "start: restore() of nothing (s)"),
                           ("restore", "restore (s)")):
            print(f"{label:<34}{full[key]:>12.4f}{only[key]:>16.4f}{only[key] / full[key]:>9.4f}")
        print("floors, same run (full state: "
              f"{fl['full bytes'] / 2**20:.0f} MiB):")
        for key in ("memcpy (full)", "write+fsync (full)", "torch.save+fsync (full)", "torch.save+fsync (adapters)"):
            print(f"  {key:<32}{fl[key]:>10.4f} s")
        print(f"full save to commit / write+fsync floor: {full['commit'] / fl['write+fsync (full)']:.2f}x; "
              f"trainable-only save to commit / torch.save of the adapters: "
              f"{only['commit'] / fl['torch.save+fsync (adapters)']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
