"""Sharded tensors (DTensor, what FSDP2's ``fully_shard`` and tensor parallelism produce) as chunks of a global box.

A DTensor is saved as its rank's local shard plus where that shard sits in the
global tensor (its offsets, from DCP's own ``__create_chunk_list__``, so the
layout rules are torch's, not ours). A shard replicated over a mesh dimension
is held by several ranks; only the one at coordinate 0 of every such dimension
writes it, so each global element is stored exactly once. Partial placements
(pending reductions) cannot be saved: their local values are not the tensor's.

Pure functions over tensors; no I/O. ``torch.distributed.tensor`` is imported
only when a DTensor is met: a job that never shards never pays for it.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ftrain.errors import CheckpointError


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor, without importing the DTensor package when nothing has."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: Any) -> torch.Tensor:
    """The rank's local shard (a view of the DTensor's own storage: writing it writes the DTensor)."""
    out: torch.Tensor = t.to_local()
    return out


def chunk_of(t: Any, name: str) -> tuple[tuple[int, ...], bool]:
    """(global offsets of this rank's shard, whether this rank writes it) for DTensor ``t``."""
    if any(p.is_partial() for p in t.placements):
        raise CheckpointError(f"cannot save {name!r}: a DTensor with Partial placement {t.placements} holds "
                              "unreduced values; redistribute it to Shard/Replicate before saving")
    chunks = t.__create_chunk_list__()
    if len(chunks) != 1:
        raise CheckpointError(f"cannot save {name!r}: its local tensor has {len(chunks)} chunks; ftrain saves one "
                              "chunk per rank")
    coord = t.device_mesh.get_coordinate()
    primary = coord is not None and all(c == 0 for c, p in zip(coord, t.placements, strict=True) if p.is_replicate())
    return tuple(int(o) for o in chunks[0].offsets), primary


def global_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)
