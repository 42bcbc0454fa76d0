"""Pretrain, then fine-tune with model selection, all fault tolerant (docs/finetuning.md).

Two phases of one small classifier (a 2-layer MLP backbone and a linear head):

``--phase pretrain``
    Trains on task A (4 classes) like ``train.py``, checkpointing with ftrain.
    At the end rank 0 also writes ``--export`` with ``torch.save(ddp_model.state_dict())``, the way many
    scripts save DDP models: every key carries DDP's ``module.`` prefix.

``--phase finetune``
    Builds the model with a new head (3 classes), loads ``--pretrained`` (a ``.pt``/``.safetensors`` file or
    an ftrain checkpoint directory) with ``ftrain.finetune.load_pretrained`` (the ``module.`` prefix is
    stripped; the head, whose shape differs, is skipped and reported), freezes the first backbone layer,
    gives the rest of the backbone a tenth of the head's learning rate, and trains on task B. Every
    ``--eval-every`` steps it reports ``val_loss``/``val_acc``: ftrain keeps the best checkpoints
    (``checkpoint.retention.keep_best``) and stops early (``early_stopping.patience``), and both survive restarts.

Runs as ``python examples/finetune.py``, under ``torchrun`` or under ``ftrain launch``. At the end rank 0
prints ``final_state_sha256=<hex>`` (model and optimizer) and ``stopped_at=<step>``.
The ftrain lines are marked ``# ftrain``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import (  # noqa: E402  (the same data generator and DDP hook as train.py)
    SyntheticDataset,
    allreduce_each_gradient,
    warmup_cosine,
)

import ftrain  # noqa: E402
from ftrain.config import load_config  # noqa: E402
from ftrain.finetune import freeze, load_pretrained, param_groups, unfreeze  # noqa: E402


class Classifier(nn.Module):
    def __init__(self, classes: int, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                                      nn.GELU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("pretrain", "finetune"), required=True)
    p.add_argument("--steps", type=int, default=120, help="maximum optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the head (backbone: a tenth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="ftrain YAML config (else $FTRAIN_CONFIG, else defaults)")
    p.add_argument("--ckpt-dir", help="checkpoint directory (overrides checkpoint.dir)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 10 if nothing sets a schedule)")
    p.add_argument("--export", help="pretrain: also write the DDP model's state_dict here (torch.save)")
    p.add_argument("--pretrained", help="finetune: weights to start from (file or ftrain checkpoint dir)")
    p.add_argument("--eval-every", type=int, default=5, help="finetune: evaluate and report every N steps")
    p.add_argument("--patience", type=int, help="finetune: early_stopping.patience (default 3)")
    p.add_argument("--keep-best", type=int, help="finetune: checkpoint.retention.keep_best (default 2)")
    p.add_argument("--trainable-only", action="store_true", help="checkpoint.trainable_only: no frozen weights")
    p.add_argument("--unfreeze-at", type=int, default=0, help="finetune: unfreeze everything at this step (0: never)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--print-every", type=int, default=10, help="print progress every N steps (0: never)")
    return p.parse_args(argv)


def evaluate(model: nn.Module, val: SyntheticDataset) -> tuple[float, float]:
    """Loss and accuracy on a fixed validation set; the same on every rank (same weights, no randomness)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(val.x)
        loss = nn.functional.cross_entropy(logits, val.y).item()
        acc = (logits.argmax(dim=1) == val.y).float().mean().item()
    model.train(was_training)
    return loss, acc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    random.seed(args.seed + rank)
    finetune = args.phase == "finetune"

    # Task B is another random problem over the same inputs, with 3 classes instead of 4.
    classes, task_seed = (3, 4321) if finetune else (4, 1234)
    model = Classifier(classes)
    if finetune:
        if not args.pretrained:
            raise ftrain.FtrainError("--phase finetune needs --pretrained PATH")
        report = load_pretrained(model, args.pretrained, skip_mismatched=True, log_report=False)  # ftrain
        if rank == 0:
            print(report, flush=True)
        freeze(model, "backbone.0.*")                                                           # ftrain
        groups = param_groups(model, {"backbone.*": args.lr / 10}, include_frozen=args.unfreeze_at > 0,  # ftrain
                              lr=args.lr)
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    train_set, val = SyntheticDataset(n=2560, classes=classes, seed=task_seed), SyntheticDataset(n=0)
    # Hold out the last 512 samples of the same problem for validation.
    val.x, val.y = train_set.x[2048:], train_set.y[2048:]
    train_set.x, train_set.y = train_set.x[:2048], train_set.y[:2048]
    loader = ftrain.ResumableLoader(train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                                    num_workers=args.workers)

    overrides: dict[str, object] = {"checkpoint.dir": args.ckpt_dir, "checkpoint.every_steps": args.save_every}
    if finetune:
        overrides.update({"checkpoint.selection.monitor": "val_loss", "checkpoint.retention.keep_best": args.keep_best,
                          "early_stopping.patience": args.patience, "checkpoint.trainable_only":
                          args.trainable_only or None})
    config = load_config(args.config, overrides=overrides)
    if config.checkpoint.every_steps == 0 and config.checkpoint.every_seconds == 0:
        config = replace(config, checkpoint=replace(config.checkpoint, every_steps=10))
    if finetune and args.patience is None and config.early_stopping.patience == 0:
        # Nothing configured early stopping: stop after 3 evaluations that do not improve val_loss by 0.001.
        config = replace(config, early_stopping=replace(config.early_stopping, patience=3, min_delta=1e-3))
    session = ftrain.Session(config)                                                            # ftrain
    session.register(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)      # ftrain
    step = session.restore()  # also restores which parameters are frozen                      # ftrain

    def wrap() -> nn.Module:
        # DDP only syncs the parameters that require grad when it is built: rebuild it when that set changes.
        if not distributed:
            return model
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, allreduce_each_gradient)  # bit-exact resumes (train.py)
        return ddp

    train_model = wrap()
    loss_fn = nn.CrossEntropyLoss()
    train_model.train()
    while step < args.steps and not session.should_stop:                                        # ftrain
        for x, y, _ in loader:
            if finetune and args.unfreeze_at and step == args.unfreeze_at - 1:
                unfreeze(model, "backbone.*")                                                   # ftrain
                train_model = wrap()
            loss = loss_fn(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if finetune and step % args.eval_every == 0:
                val_loss, val_acc = evaluate(model, val)
                session.report(val_loss=val_loss, val_acc=val_acc)                              # ftrain
                if rank == 0 and args.print_every:
                    print(f"step {step} val_loss {val_loss:.4f} val_acc {val_acc:.3f}", flush=True)
            if rank == 0 and args.print_every and step % args.print_every == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            session.step(step)                                                                  # ftrain
            if step >= args.steps or session.should_stop:
                break
    session.save(step)                                                                          # ftrain
    session.close()                                                                             # ftrain

    if rank == 0:
        digest = ftrain.state_sha256([("model", model.state_dict()), ("optimizer", optimizer.state_dict())])
        print(f"stopped_at={step}", flush=True)
        print(f"final_state_sha256={digest}", flush=True)
        if args.export:
            torch.save(train_model.state_dict(), args.export)  # DDP's keys: "module.backbone.0.weight", ...
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ftrain.FtrainError as e:
        print(f"ftrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
