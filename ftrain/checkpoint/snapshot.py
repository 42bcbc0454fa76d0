"""Saving in two phases: *snapshot* (on the training thread) and *persist* (anywhere).

The snapshot encodes the state trees (JSON structure, no copies) and copies
every tensor into one host buffer that is allocated once and reused by every
later save with the same layout (page faults on fresh memory cost 10-20x a warm
copy; see docs/PERFORMANCE.md). Tensors are laid out exactly as in the shard
file, so persisting is one sequential write of the buffer plus a checksum over
it. For CUDA tensors the buffer is pinned and the copies are asynchronous; the
persist phase waits on a CUDA event before reading.

Thread-safety: a :class:`StagingArena` must not be snapshotted into while a
persist of its previous snapshot is running; the session guarantees this with
its one-save-in-flight rule.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from ftrain import faults
from ftrain.checkpoint import checksum, codec, dtensors
from ftrain.checkpoint.format import align_up, shard_names
from ftrain.checkpoint.manifest import ChunkEntry, FileEntry, TensorEntry
from ftrain.checkpoint.shard import ShardRecord
from ftrain.checkpoint.storage import LocalStorage, atomic_write, write_all

_WRITE_CHUNK = 64 << 20


class StagingArena:
    """A reusable host buffer (pinned when it stages CUDA tensors)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < nbytes or (pinned and not buf.is_pinned()):
            # Zeroed once, so alignment padding is deterministic; reused afterwards.
            buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pinned and torch.cuda.is_available())
            self._buf = buf
        return buf[:nbytes]


@dataclass
class Snapshot:
    rank: int
    step: int
    nonce: str
    trees: dict[str, Any]
    index: dict[str, TensorEntry]
    data: torch.Tensor  # uint8 view of the arena, exactly the shard file's bytes
    ready: Any = None   # torch.cuda.Event when copies from CUDA are in flight
    #: This rank's chunks of sharded tensors: name -> (chunk, global shape, dtype).
    chunks: dict[str, tuple[ChunkEntry, tuple[int, ...], str]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def take_snapshot(trees: dict[str, Any], tensors: dict[str, torch.Tensor], *, rank: int, step: int, nonce: str,
                  arena: StagingArena, sharded: dict[str, torch.Tensor] | None = None) -> Snapshot:
    """Copy ``tensors`` into ``arena`` in shard-file layout; ``trees`` is the already encoded JSON structure.

    ``tensors`` may be a subset of the tensors the trees refer to: replicated
    state is split across ranks (see :func:`owners`). ``sharded`` are DTensors:
    each rank stores its local shard as a chunk (``dtensors.py``), so a save
    copies only local bytes and never gathers. Raises for a value that is not
    JSON, before copying anything.
    """
    _, bin_name = shard_names(rank)
    json.dumps(trees)  # fail on a non-JSON value now, not in the background writer
    index: dict[str, TensorEntry] = {}
    chunks: dict[str, tuple[ChunkEntry, tuple[int, ...], str]] = {}
    sources: list[tuple[int, int, torch.Tensor]] = []  # (offset, nbytes, the tensor whose bytes go there)
    offset = 0
    for name, t in (sharded or {}).items():
        offsets, primary = dtensors.chunk_of(t, name)
        if not primary:  # a replica of a chunk another rank writes (HSDP): stored once, by that rank
            continue
        part = dtensors.local(t)
        nbytes = part.numel() * part.element_size()
        chunks[name] = (ChunkEntry(bin_name, offset, nbytes, offsets, tuple(part.shape)), dtensors.global_shape(t),
                        codec.dtype_name(t.dtype))
        sources.append((offset, nbytes, part))
        offset = align_up(offset + nbytes)
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        index[name] = TensorEntry(bin_name, offset, nbytes, codec.dtype_name(t.dtype), tuple(t.shape))
        sources.append((offset, nbytes, t))
        offset = align_up(offset + nbytes)
    any_cuda = any(t.is_cuda for _, _, t in sources)
    data = arena.get(offset, pinned=any_cuda)
    for at, nbytes, t in sources:
        if nbytes:
            dst = data[at:at + nbytes].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=t.is_cuda)
    ready = None
    if any_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return Snapshot(rank=rank, step=step, nonce=nonce, trees=trees, index=index, data=data, ready=ready,
                    chunks=chunks)


def persist(snap: Snapshot, storage: LocalStorage, tmp: str) -> tuple[ShardRecord, FileEntry]:
    """Write a snapshot as this rank's shard files in directory ``tmp``, durably: the .bin (fsynced), then the
    .json renamed in. Returns the record and the JSON file's manifest entry.

    Safe to run off the training thread: it only reads the snapshot. The
    checksum is computed here, over exactly the bytes written. Shards are always
    written to local storage; a remote tier receives committed checkpoints.
    """
    if snap.ready is not None:
        snap.ready.synchronize()
    json_name, bin_name = shard_names(snap.rank)
    view = snap.data.numpy().data if snap.nbytes else memoryview(b"")
    hasher = checksum.BlockHasher()
    with storage.create(f"{tmp}/{bin_name}") as fd:
        half = len(view) // 2
        for lo, hi in ((0, half), (half, len(view))):
            if lo == half:
                faults.point("save.mid_write", step=snap.step, rank=snap.rank)
            for start in range(lo, hi, _WRITE_CHUNK):
                chunk = view[start:min(hi, start + _WRITE_CHUNK)]
                hasher.update(chunk)
                write_all(fd, chunk)
    whole, blocks = hasher.finish()
    record = ShardRecord(rank=snap.rank, step=snap.step, nonce=snap.nonce, bin_name=bin_name,
                         bin_size=snap.nbytes, bin_checksum=whole, tensors=snap.index,
                         trees=snap.trees, bin_blocks=tuple(blocks), chunks=snap.chunks)
    faults.point("save.shard_bin_written", step=snap.step, rank=snap.rank)
    # No directory fsync here: the committing rank fsyncs the directory once for all shards.
    raw = json.dumps(record.to_json()).encode()
    atomic_write(storage.full(f"{tmp}/{json_name}"), raw, fsync_parent=False)
    return record, FileEntry(len(raw), checksum.digest(raw), snap.rank)


def owners(sizes: dict[str, int], world_size: int, pinned: Collection[str] = ()) -> dict[str, int]:
    """Which rank writes each replicated tensor: ``pinned`` names to rank 0, the rest largest first to the
    least-loaded rank.

    Pinned are the buffers of replicated modules (BatchNorm's running statistics): under DDP each rank updates
    them from its own batch and they agree again only when DDP broadcasts rank 0's at the next forward, so the
    only copy that is right on every rank after a resume is rank 0's (docs/FORMAT.md, "Where replicated tensors
    live"). A pinned name that is not in ``sizes`` is ignored. Pure and deterministic in (names, sizes,
    world_size, pinned), so every rank computes the same split without communicating. Granularity is one tensor.
    """
    load = [0] * world_size
    out: dict[str, int] = {}
    for name in sorted(set(pinned) & sizes.keys()):
        out[name] = 0
        load[0] += sizes[name]  # rank 0's share counts them: the rest is balanced around them
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        if name in out:
            continue
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += size
    return out
