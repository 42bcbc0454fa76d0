"""Worker side: checkpoint files sent from one disk's leader to another's, over gloo groups of their own.

Used in each commit to put replicas of each disk's files on other disks (``replicas.py``), and on restore to
bring a disk the files its ranks read but it lacks (``sources.py``). Why a process group and not a server of
our own: its connections were made through the job's rendezvous between the job's own processes, so nothing
here listens for strangers or needs credentials, and it is already there. Two groups over the same leaders:
one for the background writers' replicas, one for the training thread's restores, so the two never interleave
messages.

Every file is sent in :data:`CHUNK` pieces (bounded memory: one buffer per direction) after a header that
says whether the sender has an intact-looking copy; the receiver writes ``<name>.partial``, checks its size,
whole checksum and every block checksum against the manifest as the bytes arrive, and renames it into place
only if they all match: a damaged copy on the sender is refused, never propagated.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ftrain.checkpoint.checksum import BLOCK_BYTES, BlockHasher
from ftrain.checkpoint.format import PARTIAL_SUFFIX
from ftrain.checkpoint.manifest import FileEntry
from ftrain.checkpoint.storage import LocalStorage, write_all

log = logging.getLogger("ftrain")

#: Bytes per message; one block, so the receiver checks each block as it completes.
CHUNK = BLOCK_BYTES


@dataclass(frozen=True)
class FileMove:
    """One file of a checkpoint: where it is read (sender) or written (receiver), and what it must be."""

    rel: str
    entry: FileEntry


class Peers:
    """The leaders' group for one thread's transfers."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def swap(self, storage: LocalStorage, *, send: Sequence[FileMove] = (), to: int | None = None,
             receive: Sequence[FileMove] = (), source: int | None = None) -> list[str]:
        """Send ``send`` to rank ``to`` while receiving ``receive`` from rank ``source`` (both sides list the same
        files, from the same manifest). Returns the received files that did not arrive intact (the sender had
        none, or its bytes did not match the manifest); the others are in place. Collective for the two pairs."""
        out_head = torch.tensor([v for m in send for v in _header(storage, m)], dtype=torch.int64)
        in_head = torch.zeros(2 * len(receive), dtype=torch.int64)
        self._pair(out_head if send else None, to, in_head if receive else None, source)
        sending = [m for m, ok in zip(send, out_head.tolist()[::2], strict=True) if ok]
        coming = [m for m, ok in zip(receive, in_head.tolist()[::2], strict=True) if ok]
        failed = [m.rel for m in receive if m not in coming]
        readers = _Outgoing(storage, sending)
        writers = _Incoming(storage, coming)
        out_buf = torch.empty(CHUNK, dtype=torch.uint8)
        in_buf = torch.empty(CHUNK, dtype=torch.uint8)
        try:
            while not readers.done or not writers.done:
                n_out = readers.fill(out_buf) if not readers.done else 0
                n_in = writers.want() if not writers.done else 0
                self._pair(out_buf[:n_out] if n_out else None, to, in_buf[:n_in] if n_in else None, source)
                if n_in:
                    writers.take(in_buf[:n_in])
        finally:
            readers.close()
            failed += writers.close()
        return failed

    def _pair(self, out: torch.Tensor | None, to: int | None, inc: torch.Tensor | None, source: int | None) -> None:
        works = []
        if out is not None:
            works.append(dist.isend(out, dst=to, group=self.group))
        if inc is not None:
            works.append(dist.irecv(inc, src=source, group=self.group))
        for w in works:
            if w is not None:  # None only on a rank outside the group, which never calls this
                w.wait()


def _header(storage: LocalStorage, m: FileMove) -> tuple[int, int]:
    """(1, size) if this disk has the file at its listed size, else (0, 0): the receiver then expects nothing."""
    try:
        return (1, m.entry.size) if storage.size(m.rel) == m.entry.size else (0, 0)
    except OSError:
        return 0, 0


class _Outgoing:
    """The sender's files, read in :data:`CHUNK` pieces, one after the other."""

    def __init__(self, storage: LocalStorage, files: Sequence[FileMove]) -> None:
        self.storage, self.files = storage, list(files)
        self.index, self.left = -1, 0
        self.f: Any = None
        self._next()

    @property
    def done(self) -> bool:
        return self.index >= len(self.files)

    def _next(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        self.index += 1
        while self.index < len(self.files) and self.files[self.index].entry.size == 0:
            self.index += 1  # an empty file: its header said so, no bytes follow
        if self.index < len(self.files):
            m = self.files[self.index]
            self.f, self.left = self.storage.open(m.rel), m.entry.size

    def fill(self, buf: torch.Tensor) -> int:
        n = min(CHUNK, self.left)
        view = buf[:n].numpy().data
        got = 0
        while got < n:
            k = self.f.readinto(view[got:]) if self.f is not None else 0
            if not k:  # the file shrank since its header: send zeros, the receiver's checksum refuses them
                view[got:n] = bytes(n - got)
                break
            got += k
        self.left -= n
        if not self.left:
            self._next()
        return n

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class _Incoming:
    """The receiver's files: written to ``.partial`` and verified as the bytes arrive, renamed in when intact."""

    def __init__(self, storage: LocalStorage, files: Sequence[FileMove]) -> None:
        self.storage, self.files = storage, list(files)
        self.index, self.left, self.fd = -1, 0, -1
        self.hasher = BlockHasher()
        self.failed: list[str] = []
        self._next()

    @property
    def done(self) -> bool:
        return self.index >= len(self.files)

    def _partial(self, m: FileMove) -> str:
        return f"{m.rel}{PARTIAL_SUFFIX}"

    def _next(self) -> None:
        self.index += 1
        if self.index < len(self.files):
            m = self.files[self.index]
            self.hasher, self.left = BlockHasher(), m.entry.size
            full = self.storage.full(self._partial(m))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
            self.fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            if not self.left:
                self._finish()

    def want(self) -> int:
        return min(CHUNK, self.left)

    def take(self, data: torch.Tensor) -> None:
        view = data.numpy().data
        self.hasher.update(view)
        write_all(self.fd, view)
        self.left -= len(view)
        if not self.left:
            self._finish()

    def _finish(self) -> None:
        m = self.files[self.index]
        whole, blocks = self.hasher.finish()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        ok = whole == m.entry.checksum and (m.entry.blocks is None or tuple(blocks) == m.entry.blocks)
        if ok:
            os.replace(self.storage.full(self._partial(m)), self.storage.full(m.rel))
        else:
            self.storage.delete(self._partial(m))
            self.failed.append(m.rel)
            log.warning("refused %s from a peer: its bytes do not match the manifest's checksums",
                        self.storage.describe(m.rel))
        self._next()

    def close(self) -> list[str]:
        """The files that failed, and those never finished (the transfer broke off); no partial file is left."""
        unfinished = [m.rel for m in self.files[max(self.index, 0):]]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for m in self.files[max(self.index, 0):]:
            self.storage.delete(self._partial(m))
        return self.failed + unfinished
