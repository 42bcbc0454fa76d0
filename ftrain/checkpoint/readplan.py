"""Which bytes of which files a rank reads on restore, and where each lands: pure planning, no I/O.

Every tensor a rank restores has a *target*: a contiguous CPU tensor the bytes
go straight into (a registered tensor's own storage where it fits, else a fresh
one), and its box in the global tensor (all zeros for a tensor stored whole).
A whole tensor is one piece. A sharded tensor's target gets one piece per
saved chunk it overlaps: the chunk's rows that overlap the target, which are
contiguous in the file because chunks are stored row-major. A piece is
*direct* when those bytes are also contiguous in the target (the overlap spans
every dimension but the first in both: FSDP2's row sharding, at any world
size), so they are read into the target's memory with no copy; otherwise the
rows are read into scratch and the box is copied out.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ftrain.checkpoint.checksum import BLOCK_BYTES
from ftrain.checkpoint.manifest import ChunkEntry, TensorEntry


@dataclass(frozen=True, eq=False)
class Target:
    name: str
    tensor: torch.Tensor
    #: The target's box in the global tensor: offsets, and its sizes are ``tensor.shape``.
    offsets: tuple[int, ...]
    #: A registered tensor's own storage: written only once every rank has verified (phase two of a load).
    live: bool


@dataclass(frozen=True, eq=False)
class Piece:
    file: str
    start: int
    nbytes: int
    target: Target
    #: Direct: the bytes go to ``target`` at byte ``dst_byte``. Otherwise the span is viewed as ``span_shape``
    #: rows and ``src_box`` of it is copied to ``dst_box`` of the target.
    direct: bool
    dst_byte: int = 0
    span_shape: tuple[int, ...] = ()
    src_box: tuple[slice, ...] = ()
    dst_box: tuple[slice, ...] = ()


def whole(target: Target, entry: TensorEntry) -> Piece:
    return Piece(entry.file, entry.offset, entry.nbytes, target, direct=True)


def sharded(target: Target, chunks: Iterable[ChunkEntry], itemsize: int) -> list[Piece]:
    """The pieces that fill ``target`` (a box of a sharded tensor) from the saved ``chunks``."""
    t_off, t_size = target.offsets, tuple(target.tensor.shape)
    out: list[Piece] = []
    for c in chunks:
        lo = [max(a, b) for a, b in zip(t_off, c.offsets, strict=True)]
        hi = [min(a + s, b + z) for a, s, b, z in zip(t_off, t_size, c.offsets, c.sizes, strict=True)]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)) or not math.prod(c.sizes):
            continue
        if not t_size:  # 0-d: one element
            out.append(Piece(c.file, c.offset, c.nbytes, target, direct=True))
            continue
        row = math.prod(c.sizes[1:]) * itemsize  # bytes per first-dimension index of the chunk
        r0, r1 = lo[0] - c.offsets[0], hi[0] - c.offsets[0]
        start, nbytes = c.offset + r0 * row, (r1 - r0) * row
        full_src = all(lo[d] == c.offsets[d] and hi[d] == c.offsets[d] + c.sizes[d] for d in range(1, len(lo)))
        full_dst = all(lo[d] == t_off[d] and hi[d] == t_off[d] + t_size[d] for d in range(1, len(lo)))
        if full_src and full_dst:
            out.append(Piece(c.file, start, nbytes, target, direct=True, dst_byte=(lo[0] - t_off[0]) * row))
            continue
        src_box = (slice(0, r1 - r0), *(slice(lo[d] - c.offsets[d], hi[d] - c.offsets[d])
                                         for d in range(1, len(lo))))
        dst_box = tuple(slice(lo[d] - t_off[d], hi[d] - t_off[d]) for d in range(len(lo)))
        out.append(Piece(c.file, start, nbytes, target, direct=False, span_shape=(r1 - r0, *c.sizes[1:]),
                         src_box=src_box, dst_box=dst_box))
    return out


def blocks(pieces: Iterable[Piece]) -> list[tuple[int, int]]:
    """The block ranges ``[first, last)`` the pieces touch, merged and sorted (what a verifying reader hashes)."""
    spans = sorted((p.start // BLOCK_BYTES, (p.start + p.nbytes - 1) // BLOCK_BYTES + 1) for p in pieces if p.nbytes)
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def covered(target: Target, pieces: Iterable[Piece]) -> bool:
    """Whether ``pieces`` fill every element of ``target`` (the manifest's tiling check rules out overlaps, so
    counting elements suffices)."""
    itemsize = target.tensor.element_size()
    filled = sum(p.nbytes // itemsize if p.direct else math.prod(s.stop - s.start for s in p.dst_box)
                 for p in pieces if p.target is target)
    return filled == target.tensor.numel()
