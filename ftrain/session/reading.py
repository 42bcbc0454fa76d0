"""Worker side: what one rank reads of a checkpoint on restore, straight into where it goes.

Every rank restores the replicated tensors (each needs its own copy), the
per-rank tensors of the saving ranks it takes over (its own; after a resize,
every saver's) and, of each sharded tensor, the box of it that it holds now.
Each tensor gets a :class:`~ftrain.checkpoint.readplan.Target`: a registered
module's own tensor where shape, dtype and device fit (read in place: no new
tensor, no copy into the model), else a fresh one; a sharded target is the
rank's local shard of a DTensor laid out as the registered model is now, at any
world size or mesh (``readplan.sharded``).

Who reads and verifies what, so each byte is verified once and read from disk
once per node: on one node every rank reads the replicated tensors it needs
from the page cache, but verifies only those in the files it is the reader of
(saver ``s``'s file: rank ``s mod W``); across nodes the reader reads them and
broadcasts them. Per-rank and sharded pieces are verified by the rank that
reads them. The ranks agree on the verdicts before anything registered is
written (``Checkpointer.restore``).

Not thread-safe; one per restore attempt.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ftrain.checkpoint import codec, dtensors, format, readplan
from ftrain.checkpoint.direct import DirectReader
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import ChunkEntry, Manifest
from ftrain.checkpoint.readplan import Piece, Target
from ftrain.checkpoint.shard import ensure_memory
from ftrain.checkpoint.storage import LocalStorage
from ftrain.errors import CorruptCheckpoint
from ftrain.session.collectives import Collectives

#: name -> (tensor, live): a registered tensor to read into (live), or a DTensor template to lay a fresh one out
#: like (``Registry.targets``).
Targets = Mapping[str, tuple[torch.Tensor, bool]]


@dataclass
class _Slot:
    target: Target
    value: Any                       # what the decoded tree holds: the tensor, or the DTensor it is a shard of
    then: torch.Tensor | None = None  # a device tensor the bytes are copied to once read (CUDA targets)
    pieces: list[Piece] = field(default_factory=list)


class RankReader:
    def __init__(self, manifest: Manifest, storage: LocalStorage, coll: Collectives, *, single_node: bool,
                 targets: Targets, readers: Mapping[int, int] | None = None, dry: bool = False) -> None:
        """``readers``: saver -> the rank that reads its replicated tensors (default ``saver mod W``; see
        ``assembly.readers``). ``dry``: plan only, with no tensor allocated (:meth:`files` says what it would
        read)."""
        self.m, self.coll, self.single, self.dry = manifest, coll, single_node, dry
        self.rank, self.world_size = coll.rank, coll.world_size
        self.readers = dict(readers or {})
        ckpt = format.step_dirname(manifest.step)
        self.io = DirectReader(storage, ckpt, manifest.files)
        self.describe = storage.describe(ckpt)
        self.slots: dict[str, _Slot] = {}
        self._done: set[Piece] = set()  # filled by verify()
        self._plan(targets)

    def sources(self) -> list[int]:
        """The saving ranks whose per-rank state this rank takes over: its own, or after a resize every one's."""
        return sources(self.m, self.world_size, self.rank)

    def reader_of(self, saver: int) -> int:
        """The rank that reads (and verifies, and across nodes broadcasts) the replicated tensors of ``saver``'s
        file: one whose disk holds it (``readers``), by default the saver itself at the same world size; after
        a resize they are dealt round-robin."""
        return self.readers.get(saver, saver % self.world_size)

    def files(self) -> set[str]:
        """Every file this rank reads: its pieces' and the shard records it decodes (``records_read``)."""
        return {p.file for p in self.pieces() if p.nbytes} | records_read(self.m, self.world_size, self.rank)

    # ---------------------------------------------------------------- planning
    def _plan(self, targets: Targets) -> None:
        mine = tuple(rank_key(r) + "/" for r in self.sources())
        for name, entry in self.m.tensors.items():
            if name.startswith(f"{REPLICATED}/"):
                saver = self.m.files[entry.file].rank
                reads = self.single or self.reader_of(saver) == self.rank
                slot = self._slot(name, entry.shape, entry.dtype, targets.get(name))
                if dtensors.is_dtensor(slot.value):  # saved whole, sharded now: the whole tensor is one chunk
                    chunk = ChunkEntry(entry.file, entry.offset, entry.nbytes, (0,) * len(entry.shape), entry.shape)
                    slot.pieces = readplan.sharded(slot.target, [chunk], slot.target.tensor.element_size())
                elif reads:
                    slot.pieces = [readplan.whole(slot.target, entry)]
            elif name.startswith(mine):
                slot = self._slot(name, entry.shape, entry.dtype, None)
                slot.pieces = [readplan.whole(slot.target, entry)]
        for name, sh in self.m.sharded.items():
            live = targets.get(name) or targets.get(name.rsplit("/", 1)[0])
            slot = self._slot(name, sh.shape, sh.dtype, live)
            slot.pieces = readplan.sharded(slot.target, sh.chunks, slot.target.tensor.element_size())
        if not self.dry:
            ensure_memory(sum(s.target.tensor.numel() * s.target.tensor.element_size()
                              for s in self.slots.values() if not s.target.live), self.describe)

    def _slot(self, name: str, shape: tuple[int, ...], dtype_name: str,
              offer: tuple[torch.Tensor, bool] | None) -> _Slot:
        dtype = codec.dtype_from_name(dtype_name)
        slot: _Slot | None = None
        if offer is not None:
            t, live = offer
            if dtensors.is_dtensor(t):
                if tuple(t.shape) == shape and t.dtype == dtype:
                    # Fresh: laid out like the parameter it belongs to (a dry plan needs the layout only).
                    value = t if live or self.dry else torch.empty_like(t)
                    offsets, _ = dtensors.chunk_of(value, name)
                    slot = self._local(name, dtensors.local(value), offsets, value, live)
            elif live and tuple(t.shape) == shape and t.dtype == dtype:
                slot = self._local(name, t, (0,) * len(shape), t, True)
        if slot is None:  # nothing registered to read into: a fresh tensor, whole (also a sharded one)
            fresh = torch.empty(shape, dtype=dtype, device="meta" if self.dry else "cpu")
            slot = _Slot(Target(name, fresh, (0,) * len(shape), live=False), fresh)
        self.slots[name] = slot
        return slot

    def _local(self, name: str, t: torch.Tensor, offsets: tuple[int, ...], value: Any, live: bool) -> _Slot:
        if (t.device.type == "cpu" and t.is_contiguous()) or self.dry:
            return _Slot(Target(name, t, offsets, live), value)
        # A CUDA tensor (or a strided one): the bytes land in host memory, then one copy to it.
        staging = torch.empty(tuple(t.shape), dtype=t.dtype, pin_memory=t.is_cuda and torch.cuda.is_available())
        return _Slot(Target(name, staging, offsets, live), value, then=t)

    # ------------------------------------------------------------------- reads
    def pieces(self) -> list[Piece]:
        return [p for s in self.slots.values() for p in s.pieces]

    def _mine_to_verify(self, p: Piece) -> bool:
        """Replicated pieces on one node are verified by their file's reader; everything else by whoever reads it."""
        if not self.single or not p.target.name.startswith(f"{REPLICATED}/") or p.target.name in self.m.sharded:
            return True
        return self.reader_of(self.m.files[p.file].rank) == self.rank

    def verify(self) -> None:
        """Check every block this rank is responsible for (raises CorruptCheckpoint); fresh targets fill on the
        way. Touches nothing registered."""
        for name, slot in self.slots.items():
            if not readplan.covered(slot.target, slot.pieces) and (slot.pieces or self.single):
                raise CorruptCheckpoint(self.describe, f"tensor {name!r}: the saved chunks do not cover this rank's "
                                                       "part of it")
        mine = [p for p in self.pieces() if self._mine_to_verify(p)]
        self._done = self.io.verify(mine)

    def fill(self, live: bool) -> None:
        """After every rank verified: read the pieces of fresh (``live`` False) or registered targets, then (across
        nodes) broadcast the replicated tensors from their readers. Collective."""
        self.io.fill([p for p in self.pieces() if p.target.live == live and p not in self._done])
        for name, slot in sorted(self.slots.items()):
            if slot.target.live != live:
                continue
            if not self.single and self.world_size > 1 and name in self.m.tensors and name.startswith(
                    f"{REPLICATED}/") and not dtensors.is_dtensor(slot.value):
                saver = self.m.files[self.m.tensors[name].file].rank
                self.coll.broadcast_tensor(slot.target.tensor, src=self.reader_of(saver))
            if slot.then is not None:
                slot.then.copy_(slot.target.tensor)

    def values(self) -> Callable[[str], Any]:
        """The decoder's lookup: the tensor (or DTensor) each name restores into."""
        return lambda name: self.slots[name].value

    def close(self) -> None:
        self.io.close()


def sources(m: Manifest, world_size: int, rank: int) -> list[int]:
    """The saving ranks whose per-rank state ``rank`` takes over: its own, or after a resize every one's."""
    return list(range(m.world_size)) if m.world_size != world_size else [rank]


def records_read(m: Manifest, world_size: int, rank: int) -> set[str]:
    """The shard records (``shard-R.json``) a rank decodes on restore: rank 0's (the replicated tree) and those
    of the saving ranks it takes over (``Checkpointer._read_records``)."""
    return {format.shard_names(r)[0] for r in {0, *sources(m, world_size, rank)}}
