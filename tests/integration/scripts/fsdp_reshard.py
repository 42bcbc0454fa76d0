"""An FSDP2 job that restores, dumps its full state, trains a few steps and saves: for the resharding tests.

    fsdp_reshard.py CKPT --dump-restored A.safetensors --train N --dump-saved B.safetensors

Under torchrun with W > 1 ranks the example's transformer is sharded with ``fully_shard`` over all ranks; with
one process it is a plain module (reading a sharded checkpoint into whole tensors). Dumps hold every tensor of
the model and AdamW state as gathered whole tensors (test-side only, through torch's full state dict), so runs
at different world sizes can be compared bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import train  # noqa: E402  (the example's model and FSDP2 wrapping)

import ftrain  # noqa: E402


def flat(state: list[tuple[str, dict]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value.detach().clone().contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for name, tree in state:
        walk(name, tree)
    return out


def dump(model: torch.nn.Module, opt: torch.optim.Optimizer, sharded: bool, path: str | None, step: int) -> None:
    if sharded:
        state = train.full_state(model, opt)
    else:  # keyed by parameter name, like the sharded optimizer's, so dumps compare across world sizes
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        state = [("model", msd), ("optimizer", osd)]
    if path and int(os.environ.get("RANK", "0")) == 0:
        tensors = flat(state)
        tensors["step"] = torch.tensor(step)
        save_file(tensors, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--dump-restored")
    p.add_argument("--dump-saved")
    p.add_argument("--train", type=int, default=0)
    args = p.parse_args()
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = train.shard(train.TinyTransformer()) if sharded else train.TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    session = ftrain.Session(overrides={"checkpoint.dir": args.ckpt, "checkpoint.retention.keep_last": 3,
                                        "checkpoint.on_resize": "resume"})
    session.register(model=model, optimizer=opt)
    step = session.restore()
    print(f"restored={step} world={session.world_size}", flush=True)
    dump(model, opt, sharded, args.dump_restored, step)
    g = torch.Generator().manual_seed(1000 + step)
    for _ in range(args.train):
        x = torch.randn(8, 16, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    if args.train:
        session.save(step, blocking=True)
        dump(model, opt, sharded, args.dump_saved, step)
    session.close()
    if sharded:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
