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
* ``delete`` removes a file or a whole directory; a missing path is not an error;
* reads stay inside the root and see only regular files and directories: a
  symbolic link, FIFO, socket or device anywhere on the path is refused with
  :class:`UnsafeEntry` (never followed, never opened for reading: a FIFO would
  block and ``/dev/zero`` never ends); ``read`` refuses a file larger than its
  ``limit`` before reading a byte (:class:`TooLarge`).

Concurrency: any number of processes may read. Writers are coordinated by the
commit protocol (docs/FORMAT.md), not by this layer.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ftrain.checkpoint.format import PARTIAL_SUFFIX, TMP_PREFIX


class UnsafeEntry(OSError):
    """A path inside the root that is not a plain file or directory (a link, FIFO, device...), or escapes it."""


class TooLarge(OSError):
    """A file larger than the reader's documented cap (docs/FORMAT.md, "Size caps")."""


@dataclass(frozen=True)
class Entry:
    """One name in a directory listing; ``kind`` is ``dir``, ``file`` or ``other`` (links, FIFOs, devices)."""

    name: str
    kind: str
    size: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


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

    def read(self, path: str, limit: int) -> bytes:
        """The whole content of file ``path``; :class:`TooLarge` if it holds more than ``limit`` bytes."""
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
            fd = self._open_dir(path)
        except (FileNotFoundError, NotADirectoryError, UnsafeEntry):
            return []
        out = []
        try:
            for e in os.scandir(fd):
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # deleted while listing
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
                out.append(Entry(e.name, kind, st.st_size if kind == "file" else 0))
        finally:
            os.close(fd)
        return out

    def is_dir(self, path: str) -> bool:
        try:
            os.close(self._open_dir(path))
        except (OSError, ValueError):
            return False
        return True

    def size(self, path: str) -> int:
        parent, name = self._walk(path)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        _check_regular(st.st_mode, self.describe(path))
        return st.st_size

    def read(self, path: str, limit: int) -> bytes:
        with self.open(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise TooLarge(errno.EFBIG, f"{size} bytes, over the {limit}-byte limit for this file",
                               self.describe(path))
            return read_bounded(f, limit, self.describe(path))

    def open(self, path: str) -> io.RawIOBase:
        parent, name = self._walk(path)
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = _open_below(parent, name, os.O_RDONLY | os.O_NONBLOCK, self.describe(path))
        try:
            _check_regular(os.fstat(fd).st_mode, self.describe(path))
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "rb", buffering=0)  # buffering=0: a FileIO

    def _walk(self, path: str) -> tuple[int, str]:
        """An fd of ``path``'s parent directory (caller closes it), reached without following links, and the
        last component."""
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeEntry(errno.EINVAL, "not a plain relative path inside the checkpoint root",
                              self.describe(path))
        return self._open_dir("/".join(parts[:-1])), parts[-1]

    def _open_dir(self, path: str) -> int:
        """An fd of directory ``path`` under the root, each component opened with O_NOFOLLOW.

        The root itself may be a link (the user chose it); nothing below it may be.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in filter(None, path.split("/")):
            if part in (".", ".."):
                os.close(fd)
                raise UnsafeEntry(errno.EINVAL, "not a plain relative path", self.describe(path))
            fd = _open_below(fd, part, os.O_RDONLY | os.O_DIRECTORY, self.describe(path))
        return fd

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
            shutil.rmtree(target, ignore_errors=True)  # fd-based on Linux: never follows a link out of the tree
        else:
            target.unlink(missing_ok=True)

    @contextmanager
    def create(self, path: str) -> Iterator[int]:
        """A new file ``path`` as a raw descriptor; fsynced when the block ends without an error."""
        full = self.full(path)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            yield fd
            os.fsync(fd)
        except OSError as e:
            if e.filename is None:  # os.write/fsync errors name no file: say which one failed
                e.filename = str(full)
            raise
        finally:
            os.close(fd)

    def fsync(self, path: str = "") -> None:
        """Make renames and creations inside directory ``path`` durable."""
        fsync_dir(self.full(path))


def _open_below(dirfd: int, name: str, flags: int, where: str) -> int:
    """Open ``name`` in directory ``dirfd`` (which this closes) without following a link: O_NOFOLLOW makes a
    link fail with ELOOP rather than lead out of the root, or to /dev/zero."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as e:
        raise _unsafe_if_link(e, where) from None
    finally:
        os.close(dirfd)


def _check_regular(mode: int, where: str) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise UnsafeEntry(errno.EINVAL, f"{kind}, not a regular file (ftrain reads only regular files)", where)


def _unsafe_if_link(e: OSError, where: str) -> OSError:
    """ELOOP from O_NOFOLLOW (and ENOTDIR from O_DIRECTORY on a link) mean a symbolic link is in the way."""
    if e.errno == errno.ELOOP:
        return UnsafeEntry(e.errno, "a symbolic link (ftrain never follows links inside a checkpoint root)", where)
    if e.errno == errno.ENOTDIR and os.path.islink(where):
        return UnsafeEntry(e.errno, "a symbolic link (ftrain never follows links inside a checkpoint root)", where)
    return e


def read_bounded(f: io.RawIOBase, limit: int, where: str) -> bytes:
    """All of ``f``, refusing (:class:`TooLarge`) more than ``limit`` bytes: reads one byte past the limit, so a
    file (or object) that grew since its size was checked is caught too."""
    buf = bytearray()
    while len(buf) <= limit:
        chunk = f.read(min(1 << 20, limit + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    if len(buf) > limit:
        raise TooLarge(errno.EFBIG, f"over the {limit}-byte limit for this file", where)
    return bytes(buf)


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
    # A planted `name.partial` link must not make us truncate its target: remove it, then create exclusively.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync_parent:
        fsync_dir(path.parent)
