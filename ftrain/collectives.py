"""The few collectives ftrain needs, on a gloo group (CPU tensors) whatever the training backend.

Used only from the training thread, at points every rank reaches together
(restore, step boundaries, synchronous saves). The background writer never
uses them. With one process every call is a local no-op.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ftrain.errors import CheckpointError, FtrainError


class Collectives:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group: Any = None

    def setup(self) -> None:
        if self.world_size == 1 or self._group is not None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise FtrainError(f"WORLD_SIZE={self.world_size} but torch.distributed is not initialized: call "
                              "torch.distributed.init_process_group() before creating the ftrain Session")
        # Our small control messages travel on CPU tensors; NCCL cannot carry those, so use a gloo side group.
        self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` on every rank."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(t, src=0, group=self._group)
        return t.tolist()

    def broadcast_tensor(self, tensor: torch.Tensor, src: int) -> None:
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self._group)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Element-wise "true on any rank", in one collective."""
        if self.world_size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return tuple(bool(v) for v in t.tolist())

    def check_all(self, err: FtrainError | None) -> None:
        """Raise on every rank if any rank failed, so no rank is left waiting in a collective."""
        if self.any(err is not None)[0]:
            raise err or CheckpointError("another rank failed while handling checkpoints; see its log")
