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
    """The rank's local shard (the DTensor's own storage: writing it writes the DTensor).

    The attribute, not ``to_local()``: that is an autograd function (about 70 us a call, a third of an FSDP2
    save's blocking time over a few hundred tensors), and neither saving nor restoring wants a graph.
    """
    out = getattr(t, "_local_tensor", None)
    return out if isinstance(out, torch.Tensor) else t.to_local()


#: (global shape, placements, mesh, local shape) -> chunk_of's answer. The layout of a training job's DTensors never
#: changes between saves, and torch's offset computation costs ~0.25 ms per tensor: a quarter of the blocking
#: time of an FSDP2 save of a few hundred tensors. Bounded by the distinct layouts a job has.
_CHUNKS: dict[tuple[Any, ...], tuple[tuple[int, ...], bool]] = {}


def chunk_of(t: Any, name: str) -> tuple[tuple[int, ...], bool]:
    """(global offsets of this rank's shard, whether this rank writes it) for DTensor ``t``."""
    mesh = t.device_mesh
    key = (tuple(t.shape), tuple(t.placements), id(mesh), tuple(mesh.shape), tuple(local(t).shape))
    hit = _CHUNKS.get(key)
    if hit is None:
        hit = _CHUNKS[key] = _chunk_of(t, name)
    return hit


def _chunk_of(t: Any, name: str) -> tuple[tuple[int, ...], bool]:
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
