"""load_pretrained of a DCP directory into the example's FSDP2 transformer, then dump its full model state.

    dcp_load_fsdp.py DCP_DIR OUT.safetensors

Under torchrun (W > 1 ranks) the model is sharded with ``fully_shard`` over all ranks before loading, so DCP
reads each rank's shards; rank 0 writes the gathered whole tensors as ``model/<fqn>`` (the keys of
fsdp_reshard.py's dumps), so the test compares them bit for bit.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import train  # the example's model and FSDP2 wrapping

from ftrain.finetune import load_pretrained


def main() -> int:
    source, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(123)  # other weights than the run that was exported
    model = train.shard(train.TinyTransformer())
    report = load_pretrained(model, source, strict=True)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    print(f"rank={dist.get_rank()} loaded={len(report.loaded)} ok={report.ok} sharded={sharded}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd = dict(train.full_state(model, opt))["model"]  # collective: gathers the shards
    if int(os.environ["RANK"]) == 0:
        save_file({f"model/{k}": v.detach().clone().contiguous() for k, v in msd.items()}, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
