"""A small CNN with BatchNorm under DDP (gloo), for tests/integration/test_batchnorm.py.

Each rank updates BatchNorm's running statistics from its own batch; DDP
broadcasts rank 0's at the start of each forward. At every step a save was
started, each rank appends ``step <hash of its buffers>`` to
``<buffer-log>/rank<r>.txt`` (what the checkpoint should hold is rank 0's). At
the end rank 0 prints ``final_state_sha256=`` over the model (parameters and
every buffer) and the optimizer.

``BN_DIVERGE_AT=N``: rank 1 adds noise to one replicated parameter outside DDP
after step N, to exercise ``checkpoint.check_replicated``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import TensorDataset

import ftrain
from ftrain.config import load_config


def build_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def record(log: Path, step: int, model: nn.Module) -> None:
    """Append ``step <hash of this rank's buffers>`` (opened per save: the process may be SIGKILLed any time)."""
    with log.open("a") as f:
        f.write(f"{step} {ftrain.state_sha256([('buffers', dict(model.named_buffers()))])}\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--buffer-log", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights and data on every rank
    data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 3, (256,)))
    model = build_model()
    # find_unused_parameters=True: no bucket rebuild after the first iteration (docs/exactness.md).
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = ftrain.ResumableLoader(data, batch_size=8, shuffle=True, seed=0)
    config = load_config(overrides={"checkpoint.dir": args.ckpt_dir, "checkpoint.every_steps": args.save_every})
    session = ftrain.Session(config)
    session.register(model=model, optimizer=optimizer, loader=loader)
    step = session.restore()
    Path(args.buffer_log).mkdir(parents=True, exist_ok=True)
    log = Path(args.buffer_log) / f"rank{rank}.txt"
    diverge_at = int(os.environ.get("BN_DIVERGE_AT", "0"))
    loss_fn = nn.CrossEntropyLoss()
    ddp.train()
    while step < args.steps:
        for x, y in loader:
            loss = loss_fn(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 1 and step == diverge_at:
                with torch.no_grad():  # outside DDP: this rank's copy of a replicated parameter now differs
                    model[3].weight.add_(1e-3 * torch.randn_like(model[3].weight))
            if session.step(step):
                record(log, step, model)
            if step >= args.steps:
                break
    session.save(step)
    record(log, step, model)
    session.close()
    if rank == 0:
        digest = ftrain.state_sha256([("model", model.state_dict()), ("optimizer", optimizer.state_dict())])
        print(f"final_state_sha256={digest}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ftrain.FtrainError as e:
        print(f"ftrain: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
