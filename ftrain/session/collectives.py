"""Worker side: the few collectives ftrain needs, on a gloo group (CPU tensors) whatever the training backend.

Used only from the training thread, at points every rank reaches together
(restore, step boundaries, synchronous saves). The background writer never
uses them. With one process every call is a local no-op.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ftrain.errors import FtrainError, PeerFailed


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

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (two collectives: the lengths, then the bytes padded to the
        longest). For small records (disk ids, holdings); JSON, never pickle."""
        if self.world_size == 1:
            return [bytes(data)]
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self._group)
        longest = max(int(s) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(out, buf, group=self._group)
        return [o.numpy().tobytes()[:int(n)] for o, n in zip(out, sizes, strict=True)]

    def broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        """``src``'s ``data`` on every rank (the others pass None)."""
        if self.world_size == 1:
            return bytes(data or b"")
        (n,) = self._broadcast_ints([len(data) if self.rank == src and data is not None else 0], src)
        buf = torch.zeros(n, dtype=torch.uint8)
        if self.rank == src and n:
            buf[:] = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8)
        if n:
            dist.broadcast(buf, src=src, group=self._group)
        return buf.numpy().tobytes()

    def _broadcast_ints(self, values: list[int], src: int) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(t, src=src, group=self._group)
        return [int(v) for v in t.tolist()]

    def barrier(self) -> None:
        """Every rank has reached this point (one all-reduce: unlike a broadcast, its root waits for the others
        too)."""
        self.any(False)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Element-wise "true on any rank", in one collective."""
        if self.world_size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return tuple(bool(v) for v in t.tolist())

    def extremes(self, values: list[int]) -> tuple[list[int], list[int]]:
        """Element-wise (max, min) over the ranks of ``values`` (ints with -v representable in int64), in one
        collective: MIN is the MAX of the negated values. Every rank must pass as many values."""
        if self.world_size == 1:
            return list(values), list(values)
        n = len(values)
        t = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        out = t.tolist()
        return out[:n], [-v for v in out[n:]]

    def agree(self, flags: tuple[bool, ...], values: list[float | None]) -> tuple[tuple[bool, ...], list[float | None]]:
        """``any`` of ``flags``, plus rank 0's ``values`` (None: not reported) on every rank, in one collective.

        Per-step decisions that depend on a metric (keep-best saves, early stopping)
        must be the same on every rank even if ranks computed slightly different
        values, or only rank 0 reported one: rank 0's word is final.
        """
        if self.world_size == 1:
            return flags, list(values)
        n = len(values)
        # One float64 MAX all-reduce: flags as 0/1; per value a "present" slot (1: a number, 2: NaN, which MAX
        # cannot carry) and the value itself, which every other rank sends as -inf so rank 0's survives.
        data = [float(f) for f in flags] + [0.0] * n + [-math.inf] * n
        if self.rank == 0:
            for i, v in enumerate(values):
                if v is not None:
                    data[len(flags) + i] = 2.0 if math.isnan(v) else 1.0
                    data[len(flags) + n + i] = v if not math.isnan(v) else -math.inf
        t = torch.tensor(data, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        out = t.tolist()
        present, got = out[len(flags):len(flags) + n], out[len(flags) + n:]
        agreed = [None if p == 0 else (math.nan if p == 2 else v) for p, v in zip(present, got, strict=True)]
        return tuple(bool(v) for v in out[:len(flags)]), agreed

    def check_all(self, err: FtrainError | None) -> None:
        """Raise on every rank if any rank failed, so no rank is left waiting in a collective."""
        if self.any(err is not None)[0]:
            raise err or PeerFailed("another rank failed while handling checkpoints; see its log")
