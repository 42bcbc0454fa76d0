"""Where checkpoint bytes live: a small storage interface, and the local filesystem as its first implementation.

Everything above this module (the store, the shard readers and writers) names
files by *relative* paths under one root (``"step-000000000100/manifest.json"``)
and goes through a :class:`Storage`. The remote tier will be a second
implementation; the contract an implementation must keep is:

* ``write`` is atomic and durable: a reader sees the old content or the whole
  new one, never a torn file, and the new content survives a power cut once
  ``write`` returns;
* ``commit`` renames a finished directory to its final name atomically; the
  rename is durable when it returns; the destination must not exist;
* ``list`` shows only committed names, in no particular order;
* ``delete`` removes a file or a whole directory; a missing path is not an error.

Concurrency: any number of processes may read. Writers are coordinated by the
commit protocol (docs/FORMAT.md), not by this layer.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ftrain.checkpoint.format import PARTIAL_SUFFIX, TMP_PREFIX


@dataclass(frozen=True)
class Entry:
    """One name in a directory listing."""

    name: str
    is_dir: bool
    size: int = 0


class Storage(Protocol):
    """What the checkpoint store needs from the place its bytes live (see the module docstring)."""

    def describe(self, path: str = "") -> str:
        """A human-readable location of ``path`` (for messages): a filesystem path or a URL."""
        ...

    def ensure_writable(self) -> None:
        """Create the root if needed and prove it is writable; raises OSError."""
        ...

    def list(self, path: str = "") -> list[Entry]:
        """The entries of directory ``path``; empty if it does not exist."""
        ...

    def is_dir(self, path: str) -> bool: ...

    def size(self, path: str) -> int:
        """The size of file ``path``; FileNotFoundError if there is none."""
        ...

    def read(self, path: str) -> bytes:
        """The whole content of file ``path``."""
        ...

    def open(self, path: str) -> io.RawIOBase:
        """File ``path`` opened for unbuffered sequential reading (``readinto`` reads as much as it can)."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Atomically and durably replace file ``path`` with ``data``."""
        ...

    def makedir(self, path: str) -> None: ...

    def commit(self, src: str, dst: str) -> None:
        """Atomically and durably rename directory ``src`` to ``dst`` (which must not exist)."""
        ...

    def delete(self, path: str) -> None:
        """Remove file or directory ``path``; nothing if it is gone."""
        ...


class LocalStorage:
    """:class:`Storage` on a local (or shared POSIX) filesystem, with fsync for durability."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def full(self, path: str = "") -> Path:
        return self.root / path if path else self.root

    def describe(self, path: str = "") -> str:
        return str(self.full(path))

    def ensure_writable(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)

    def list(self, path: str = "") -> list[Entry]:
        try:
            entries = list(os.scandir(self.full(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                size = 0 if is_dir else e.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # deleted while listing
            out.append(Entry(e.name, is_dir, size))
        return out

    def is_dir(self, path: str) -> bool:
        return self.full(path).is_dir()

    def size(self, path: str) -> int:
        return os.stat(self.full(path)).st_size

    def read(self, path: str) -> bytes:
        return self.full(path).read_bytes()

    def open(self, path: str) -> io.RawIOBase:
        return open(self.full(path), "rb", buffering=0)  # buffering=0: a FileIO

    def write(self, path: str, data: bytes) -> None:
        atomic_write(self.full(path), data)

    def makedir(self, path: str) -> None:
        self.full(path).mkdir(exist_ok=True)

    def commit(self, src: str, dst: str) -> None:
        os.replace(self.full(src), self.full(dst))
        fsync_dir(self.full(dst).parent)

    def delete(self, path: str) -> None:
        target = self.full(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    @contextmanager
    def create(self, path: str) -> Iterator[int]:
        """A new file ``path`` as a raw descriptor; fsynced when the block ends without an error."""
        fd = os.open(self.full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync(self, path: str = "") -> None:
        """Make renames and creations inside directory ``path`` durable."""
        fsync_dir(self.full(path))


def fsync_dir(path: str | Path) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: Path, data: bytes, *, fsync_parent: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Write to a sibling ``.partial`` name, fsync it, rename over ``path``, then
    fsync the directory so the rename itself survives a power cut.
    """
    tmp = path.with_name(f"{path.name}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync_parent:
        fsync_dir(path.parent)
