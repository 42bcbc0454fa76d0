"""A small training job that exercises everything ftrain restores exactly.

Dropout, AdamW, a warmup+cosine LR schedule, shuffled synthetic data with random
augmentation in a DataLoader with 2 worker processes, DDP when launched with
several processes (or, with ``--fsdp``, a small transformer sharded by FSDP2). Runs as ``python examples/train.py``, under ``torchrun``, or
under ``ftrain launch``. At the end rank 0 prints one line::

    final_state_sha256=<hex>

the canonical hash of the model and optimizer state (``ftrain.state_sha256``:
model first, then optimizer; see docs/exactness.md).

The ftrain lines are marked ``# ftrain``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

import ftrain
from ftrain.config import load_config
from ftrain.data import samplelog


class SyntheticDataset(Dataset):
    """A fixed random classification task; each sample is randomly augmented when fetched."""

    def __init__(self, n: int = 2048, dim: int = 16, classes: int = 4, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x @ torch.randn(dim, classes, generator=g)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = self.x[i] + 0.05 * torch.randn(self.x.shape[1])  # augmentation draws from the worker's RNG,
        if random.random() < 0.5:                             # which ftrain seeds per (seed, epoch, index)
            x = x.flip(0)
        return x, self.y[i], i


def build_model(dim: int = 16, hidden: int = 64, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Dropout(0.1), nn.Linear(hidden, classes))


class TinyTransformer(nn.Module):
    """Each 16-feature sample as 4 tokens of 4 features, two encoder layers, mean-pooled: the FSDP2 model."""

    def __init__(self, dim: int = 16, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.tokens = dim // 4
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=64, dropout=0.1,
                                                               batch_first=True) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(x.shape[0], self.tokens, 4))
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def shard(model: TinyTransformer) -> TinyTransformer:
    """FSDP2 over all ranks: each encoder layer its own unit, the rest in the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def allreduce_each_gradient(group, bucket):  # (ProcessGroup | None, GradBucket) -> Future[Tensor]
    """A DDP communication hook: the mean over ranks of each parameter's gradient, one all-reduce each.

    DDP regroups its gradient buckets after the first iteration, so a resumed run's first iteration
    uses another bucket layout than the original run used at that step. All-reducing a whole bucket,
    gloo with more than 2 ranks then adds the gradients in another order: a resume that is close, but
    not bit-exact. One all-reduce per gradient does not depend on the layout. (docs/exactness.md,
    "DDP and bit-exact resume"; ``find_unused_parameters=True`` also works, but warns from every rank.)
    Not annotated: DDP compares a hook's annotations with its classes, and this module's are strings.
    """
    world = dist.get_world_size(group)
    works = [dist.all_reduce(grad.div_(world), group=group, async_op=True) for grad in bucket.gradients()]
    return torch.futures.collect_all([w.get_future() for w in works]).then(lambda _: bucket.buffer())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, dict]]:
    """The model and optimizer state as whole tensors on every rank (collective under FSDP2: it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return [("model", msd), ("optimizer", osd)]


def warmup_cosine(total: int, warmup: int = 10):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--global-batch", type=int, default=64,
                   help="samples per optimizer step over all ranks, kept at any world size (a resized run keeps it)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="largest per-rank batch for one forward pass; more is taken by gradient accumulation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="ftrain YAML config (else $FTRAIN_CONFIG, else defaults)")
    p.add_argument("--ckpt-dir", help="checkpoint directory (overrides checkpoint.dir)")
    p.add_argument("--save-every", type=int,
                   help="checkpoint every N steps (overrides checkpoint.every_steps; default 10 if nothing sets a "
                        "schedule)")
    p.add_argument("--save-every-seconds", type=float, help="overrides checkpoint.every_seconds")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--index-log", help="directory for per-rank logs of the sample indices each optimizer step consumed "
                                        "(ftrain.data.samplelog: one file per process group and rank)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (to slow a demo down)")
    p.add_argument("--print-every", type=int, default=10, help="print progress every N steps (0: never)")
    p.add_argument("--fsdp", action="store_true",
                   help="a small transformer sharded with FSDP2 (fully_shard) instead of an MLP under DDP")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    random.seed(args.seed + rank)

    sharded = args.fsdp and distributed
    model = shard(TinyTransformer()) if sharded else TinyTransformer() if args.fsdp else build_model()
    train_model = model
    if distributed and not sharded:
        train_model = nn.parallel.DistributedDataParallel(model)
        train_model.register_comm_hook(None, allreduce_each_gradient)  # bit-exact resumes: see the hook
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))

    overrides = {"checkpoint.dir": args.ckpt_dir, "checkpoint.every_steps": args.save_every,
                 "checkpoint.every_seconds": args.save_every_seconds}
    config = load_config(args.config, overrides=overrides)
    if config.checkpoint.every_steps == 0 and config.checkpoint.every_seconds == 0:
        # Nothing configured a schedule (library default: off): this example saves every 10 steps.
        config = replace(config, checkpoint=replace(config.checkpoint, every_steps=10))
    session = ftrain.Session(config, total_steps=args.steps)                               # ftrain
    # The same global batch at any world size: this rank's share, in micro-batches of at most --batch-size.
    plan = session.batch_plan(args.global_batch, max_micro_batch=args.batch_size)          # ftrain
    loader = ftrain.ResumableLoader(SyntheticDataset(), **plan.loader_args(), shuffle=True, seed=args.seed,
                                    num_workers=args.workers)
    session.register(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)  # ftrain
    step = session.restore()                                                                # ftrain
    if rank == 0 and args.print_every:
        print(f"world {session.world_size}: batches of {plan.micro_batch} x {plan.accumulation} per rank and step, "
              f"global batch {plan.global_batch}; starting after step {step}", flush=True)

    index_log = (samplelog.SampleLog(args.index_log, samplelog.group_id(), session.world_size, rank)
                 if args.index_log else None)
    loss_fn = nn.CrossEntropyLoss()
    train_model.train()
    micro, consumed, step_loss = 0, [], torch.zeros(())
    while step < args.steps:
        for x, y, idx in loader:
            micro += 1
            consumed += idx.tolist()
            last = micro == plan.accumulation
            # Gradients are summed over the accumulation batches; DDP all-reduces only with the last one.
            if sharded:
                model.set_requires_gradient_sync(last)  # FSDP2's no_sync: reduce-scatter with the last one
            with contextlib.nullcontext() if last or not distributed or sharded else train_model.no_sync():
                loss = loss_fn(train_model(x), y)
                (loss / plan.accumulation).backward()
            step_loss += loss.detach() / plan.accumulation
            if not last:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if index_log:
                index_log.write(step, consumed)
            if args.print_every and step % args.print_every == 0:
                if distributed:  # the mean over the whole global batch: comparable across world sizes
                    dist.all_reduce(step_loss)
                    step_loss /= session.world_size
                if rank == 0:
                    print(f"step {step} loss {step_loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            micro, consumed, step_loss = 0, [], torch.zeros(())
            if args.step_sleep:
                time.sleep(args.step_sleep)
            session.step(step)                                                              # ftrain
            if step >= args.steps:
                break
    session.save(step)  # a final checkpoint, so the finished run is also verifiable        # ftrain
    session.close()     # wait for the background write to commit                          # ftrain

    state = full_state(model, optimizer) if sharded else [("model", model.state_dict()),
                                                              ("optimizer", optimizer.state_dict())]
    if rank == 0:
        print(f"final_state_sha256={ftrain.state_sha256(state)}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ftrain.FtrainError as e:
        print(f"ftrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
