"""Restore's reads: verify the blocks a rank's plan touches, and read each piece straight into its target.

Two passes, because a registered tensor's memory may only change once every
rank has verified what it reads (a failed restore leaves every object as it
was): :meth:`DirectReader.verify` hashes the blocks (``checksum.BLOCK_BYTES``)
the pieces touch, reading the pieces whose targets are fresh tensors straight
into them on the way; :meth:`DirectReader.fill` later reads the rest (live
targets) straight into their storage, with ``os.preadv``: from the page cache,
one kernel copy, no intermediate tensor. Files of format versions 1 and 2 have
no block checksums: their whole file is one block.

Reads only local files (a remote checkpoint is fetched to the local tier
first). Not thread-safe; one reader per restore attempt.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import torch
import xxhash

from ftrain.checkpoint import readplan
from ftrain.checkpoint.checksum import BLOCK_BYTES
from ftrain.checkpoint.manifest import FileEntry
from ftrain.checkpoint.readplan import Piece
from ftrain.checkpoint.storage import LocalStorage
from ftrain.errors import CorruptCheckpoint

_SCRATCH = 4 << 20


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t`` (writing them writes ``t``)."""
    if not t.numel():
        return memoryview(b"")
    return t.detach().reshape(-1).view(torch.uint8).numpy().data


class _Checker:
    """Compares the bytes fed in file order, from the start of block ``first``, with the expected checksums."""

    def __init__(self, where: str, expected: tuple[str, ...], block: int, first: int) -> None:
        self.where, self.expected, self.block, self.index = where, expected, block, first
        self.h = xxhash.xxh3_128()
        self.fill = 0

    def feed(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self.block - self.fill)
            self.h.update(view[:take])
            self.fill += take
            view = view[take:]
            if self.fill == self.block:
                self.close()

    def close(self) -> None:
        if not self.fill:
            return
        got, want = self.h.hexdigest(), self.expected[self.index]
        if got != want:
            lo = self.index * self.block
            raise CorruptCheckpoint(self.where, f"checksum mismatch in bytes {lo}..{lo + self.fill} (block "
                                                f"{self.index}: manifest {want}, file {got})")
        self.index += 1
        self.h.reset()
        self.fill = 0


class DirectReader:
    def __init__(self, storage: LocalStorage, ckpt: str, files: dict[str, FileEntry]) -> None:
        """``ckpt``: the checkpoint directory in ``storage`` (opened through it: no link below the root is
        followed, no special file read); ``files``: its manifest's file entries."""
        self.storage, self.ckpt, self.files = storage, ckpt, files
        self._open: dict[str, io.RawIOBase] = {}
        self._scratch = bytearray(_SCRATCH)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def _where(self, name: str) -> str:
        return self.storage.describe(f"{self.ckpt}/{name}")

    def _fd(self, name: str) -> int:
        if name not in self._open:
            entry = self.files[name]
            try:
                f = self.storage.open(f"{self.ckpt}/{name}")
            except FileNotFoundError:
                raise CorruptCheckpoint(self._where(name), "file listed in the manifest is missing") from None
            except OSError as e:
                raise CorruptCheckpoint(self._where(name), f"cannot read ({e.strerror or e})") from None
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                f.close()
                raise CorruptCheckpoint(self._where(name), f"size {size} bytes, manifest says {entry.size} "
                                                           "(truncated or overwritten)")
            self._open[name] = f
        return self._open[name].fileno()

    def _read(self, name: str, view: memoryview, at: int) -> None:
        fd, got = self._fd(name), 0
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:]], at + got)
                if not n:
                    raise CorruptCheckpoint(self._where(name), "file shrank while being read")
                got += n
        except OSError as e:
            raise CorruptCheckpoint(self._where(name), f"read error ({e.strerror or e})") from None

    def verify(self, pieces: Iterable[Piece]) -> set[Piece]:
        """Verify the blocks that ``pieces`` touch; read fresh direct pieces on the way.

        Returns the pieces it filled. Raises :class:`CorruptCheckpoint` naming the file and the byte range.
        """
        by_file: dict[str, list[Piece]] = {}
        for p in pieces:
            by_file.setdefault(p.file, []).append(p)
        done: set[Piece] = set()
        for name in sorted(by_file):
            entry = self.files[name]
            self._fd(name)  # size check, even if nothing is read
            expected: tuple[str, ...]
            if entry.blocks is None:  # versions 1 and 2: the whole file is the unit of verification
                ranges, block, expected = [(0, 1)], max(entry.size, 1), (entry.checksum,)
            else:
                ranges, block, expected = readplan.blocks(by_file[name]), BLOCK_BYTES, entry.blocks
            fresh = sorted((p for p in by_file[name] if p.direct and not p.target.live and p.nbytes),
                           key=lambda p: p.start)
            for b0, b1 in ranges:
                a, z = b0 * block, min(b1 * block, entry.size)
                check = _Checker(self._where(name), expected, block, b0)
                pos = a
                for p in fresh:
                    if p.start < pos or p.start + p.nbytes > z:
                        continue  # outside this range (or overlapping a piece read already): read in fill()
                    self._skim(name, pos, p.start, check)
                    view = byte_view(p.target.tensor)[p.dst_byte:p.dst_byte + p.nbytes]
                    self._read(name, view, p.start)
                    check.feed(view)
                    done.add(p)
                    pos = p.start + p.nbytes
                self._skim(name, pos, z, check)
                check.close()
        return done

    def _skim(self, name: str, a: int, z: int, check: _Checker) -> None:
        scratch = memoryview(self._scratch)
        while a < z:
            view = scratch[:min(len(scratch), z - a)]
            self._read(name, view, a)
            check.feed(view)
            a += len(view)

    def fill(self, pieces: Iterable[Piece]) -> None:
        """Read ``pieces`` into their targets (bytes verified by some rank's :meth:`verify` already)."""
        for p in pieces:
            if not p.nbytes:
                continue
            if p.direct:
                self._read(p.file, byte_view(p.target.tensor)[p.dst_byte:p.dst_byte + p.nbytes], p.start)
                continue
            span = torch.empty(p.nbytes, dtype=torch.uint8)
            self._read(p.file, byte_view(span), p.start)
            rows = span.view(p.target.tensor.dtype).view(p.span_shape)
            p.target.tensor[p.dst_box].copy_(rows[p.src_box])
