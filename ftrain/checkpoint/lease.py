"""The lease of a checkpoint root: one writing job per directory (docs/FORMAT.md, "Lease").

``lease.lock`` (created once, never replaced: the holder keeps an exclusive
``flock`` on it for its whole life, and the kernel drops it when the process
dies) and ``lease.json`` (the owner record, :class:`LeaseRecord`, replaced
atomically, renewed every ``ttl/3`` s, removed on release if still ours).

Who may take the lease when is one pure function, :func:`decide`
(``lease_rules``). Here is the I/O around it: :class:`Lease` (held by this
process: acquire, renew, release) and :class:`Fence` (what the record must
still say for a writer to commit; workers of ``ftrain launch`` check the
launcher's lease with it), checked right before each commit rename.

Invariant: at any instant the record names at most one holder, and a writer
commits only while the record names it. Everything else (the OS lock, the ttl,
the post-write read-back) only decides who gets to be named, and when.

Thread-safety: a :class:`Lease` is acquired and released by one thread, renewed
by its daemon thread and checked by the background writer; its state changes
under one mutex. :meth:`Fence.check` reads the record from disk and shares
nothing. Reading a checkpoint root needs no lease.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ftrain.checkpoint.format import LEASE_LOCK, LEASE_RECORD, PARTIAL_SUFFIX
from ftrain.checkpoint.lease_rules import (
    LAUNCH,
    SESSION,
    Decision,
    LeaseRecord,
    Owner,
    ProcessState,
    Verdict,
    decide,
    lost_message,
    probe_process,
    refusal,
)
from ftrain.checkpoint.storage import fsync_dir, write_all
from ftrain.errors import CheckpointError, LeaseError, printable

__all__ = ["LAUNCH", "SESSION", "Decision", "Fence", "Lease", "LeaseRecord", "Owner", "ProcessState",
           "Verdict", "decide", "for_writer", "probe_process", "read_record", "write_record"]

log = logging.getLogger("ftrain.checkpoint")

#: A record holds a few hundred bytes; a larger file is damage (or hostile) and is not read.
MAX_RECORD_BYTES = 64 << 10


def read_record(root: Path) -> tuple[LeaseRecord | None, str]:
    """The record at ``root`` and, if there is none that parses, why ("" when there is simply none).

    Like every reader of a root: never follows a link, never opens a FIFO or device, reads a bounded size.
    """
    try:
        fd = os.open(root / LEASE_RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, "a symbolic link" if e.errno == errno.ELOOP else f"cannot open it: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_RECORD_BYTES:
            return None, f"{st.st_size} bytes, over the {MAX_RECORD_BYTES}-byte limit"
        data = b""
        while chunk := os.read(fd, MAX_RECORD_BYTES + 1 - len(data)):
            data += chunk
    except OSError as e:
        return None, f"cannot read it: {e.strerror or e}"
    finally:
        os.close(fd)
    try:
        return LeaseRecord.from_bytes(data), ""
    except (ValueError, UnicodeDecodeError) as e:
        return None, printable(e)[:200]


def write_record(root: Path, record: LeaseRecord) -> None:
    """Atomically and durably replace ``lease.json``.

    Not ``storage.atomic_write``: its temp name is fixed, and two writers racing (a takeover and a
    renewal) must never tear each other's record. A leftover temp file ends in ``.partial``: cleaned up.
    """
    tmp = root / f"{LEASE_RECORD}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, record.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, root / LEASE_RECORD)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(root)


def _try_lock(fd: int, where: Path) -> bool:
    """Take the exclusive OS lock without waiting; False if another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. ENOLCK on an NFS mount without a lock manager: the record alone decides
        log.warning("no OS lock on %s (%s): relying on the lease record alone", where / LEASE_LOCK,
                    e.strerror or e)
    return True


@dataclass(frozen=True)
class Fence:
    """What the record must say for a writer to commit: this process's ``token``, or the launcher's
    ``run_id`` at ``generation`` (and ``pid``, when known)."""

    root: Path
    run_id: str
    generation: int
    pid: int | None = None
    token: str | None = None

    def matches(self, record: LeaseRecord | None) -> bool:
        if record is None:
            return False
        if self.token is not None:
            return record.token == self.token
        return (record.run_id, record.generation) == (self.run_id, self.generation) and \
            self.pid in (None, record.pid)

    def check(self, doing: str) -> None:
        """Raise :class:`CheckpointError` unless the record on disk is still ours (the commit guard)."""
        record, problem = read_record(self.root)
        if not self.matches(record):
            raise CheckpointError(lost_message(str(self.root), record, problem, doing))

    def holds(self) -> bool:
        return self.matches(read_record(self.root)[0])

    def verify(self) -> None:
        """At a worker's start: :class:`LeaseError` unless the launcher still holds the lease for this run."""
        record, problem = read_record(self.root)
        if not self.matches(record):
            raise LeaseError(lost_message(str(self.root), record, problem,
                                          f"this job (run {self.run_id}, lease generation {self.generation}) will "
                                          "not write to it"))

    def release(self) -> None:
        """Nothing: the launcher holds (and releases) this lease."""


# ----------------------------------------------------------------------------- a held lease
_HELD: dict[str, Lease] = {}  # realpath of the root -> the live Lease of this process on it
_HELD_MU = threading.Lock()


class Lease:
    """The lease of ``root`` for ``owner``: :meth:`acquire`, :meth:`start_renewal`, :meth:`check`, :meth:`release`.

    ``clock`` (wall time, comparable across hosts) and ``probe`` are injectable for tests.
    """

    def __init__(self, root: str | os.PathLike[str], owner: Owner, *, ttl: float,
                 clock: Callable[[], float] = time.time,
                 probe: Callable[[int, float], ProcessState] = probe_process) -> None:
        self.root, self.owner, self.ttl, self._clock, self._probe = Path(root), owner, ttl, clock, probe
        self.record: LeaseRecord | None = None
        self._fd: int | None = None
        self._locked = self._released = False
        self._lost: str | None = None  # why, once lost
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        assert self.record is not None, "acquire() first"
        return self.record.generation

    def fence(self) -> Fence:
        assert self.record is not None, "acquire() first"
        return Fence(self.root, self.record.run_id, self.record.generation, self.record.pid, self.record.token)

    def acquire(self, *, force: bool = False, supersede: bool = False) -> Decision:
        """Take the lease (a new generation) or raise :class:`LeaseError` naming the holder and the fix.

        ``supersede``: an earlier Lease of this process on the same root (a Session never closed) is
        abandoned first: it can no longer commit. Without it, that lease's OS lock refuses us.
        """
        key = os.path.realpath(self.root)
        if supersede:
            with _HELD_MU:
                earlier = _HELD.get(key)
            if earlier is not None and earlier is not self:
                earlier._abandon("superseded by a newer lease of this process (a Session that was not closed?)")
        try:
            fd = os.open(self.root / LEASE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise LeaseError(f"cannot open {self.root / LEASE_LOCK}: {e.strerror or e}") from None
        try:
            locked = _try_lock(fd, self.root)
            record, problem = read_record(self.root)
            now = self._clock()
            decision = decide(record, now=now, me=self.owner, locked=locked, force=force, probe=self._probe,
                              where=str(self.root), problem=problem)
            if decision.verdict is Verdict.REFUSE:
                raise LeaseError(decision.message)
            o = self.owner
            mine = LeaseRecord((record.generation if record else 0) + 1, secrets.token_hex(8), o.role, o.run_id,
                               o.host, o.boot_id, o.pid, o.pid_start_unix, now, now, self.ttl,
                               " ".join(sys.argv)[:300], decision.message)
            write_record(self.root, mine)
            # Without a working OS lock two acquirers can both get here; the last rename wins, and the
            # other must learn now that it does not hold the lease.
            current, _ = read_record(self.root)
            if current is None or current.token != mine.token:
                raise LeaseError(refusal(str(self.root), current, now))
        except BaseException:
            os.close(fd)
            raise
        with self._mu:
            self._fd, self._locked, self.record = fd, locked, mine
        with _HELD_MU:
            _HELD[key] = self
        if decision.verdict is Verdict.FREE:
            log.info("holding the lease of %s (generation %d, run %s)", self.root, mine.generation, o.run_id)
        else:
            log.warning("%s (now generation %d, run %s)", decision.message, mine.generation, o.run_id)
        return decision

    def start_renewal(self) -> None:
        """Renew every ``ttl/3`` seconds from a daemon thread until released or lost."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="ftrain-lease", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception as e:  # keep renewing: a transient error must not let the lease expire
                log.warning("renewing the lease of %s failed: %s", self.root, e)

    def renew(self) -> bool:
        """Write a fresh renewal time; False (one error logged) once the lease is lost or released."""
        with self._mu:
            if self._released or self._lost is not None or self.record is None:
                return False
            current, problem = read_record(self.root)
            if current is None or current.token != self.record.token:
                self._lose(lost_message(str(self.root), current, problem,
                                        "this job will not commit any further checkpoint there"))
                return False
            if not self._locked and self._fd is not None:  # after a forced takeover: once the other let go
                self._locked = _try_lock(self._fd, self.root)
            mine = replace(self.record, renewed_unix=self._clock())
            try:
                write_record(self.root, mine)
            except OSError as e:  # e.g. our temp file removed by a worker's startup cleanup: next time
                log.warning("could not renew the lease of %s (%s); retrying", self.root, e.strerror or e)
                return True
            self.record = mine
            return True

    def check(self, doing: str) -> None:
        """The commit guard: raise :class:`CheckpointError` unless this lease is still held (``doing`` says
        what is then not done, e.g. "not committing step 20")."""
        if self._released or self.record is None:
            raise CheckpointError(f"the lease of {self.root} is not held (released) — {doing}")
        try:
            self.fence().check(doing)
        except CheckpointError as e:
            with self._mu:
                self._lose(str(e))
            raise
        if self._lost is not None:  # the record names us again, but nobody renews it any more: stay stopped
            raise CheckpointError(f"the lease of {self.root} was lost earlier — {doing}")

    def holds(self) -> bool:
        return not self._released and self._lost is None and self.record is not None and self.fence().holds()

    def lost(self) -> str | None:
        """Why this lease no longer holds the root (e.g. another job took it over), or None while it does.

        Reads the record now: the supervisor asks before each restart, since restarted workers would only
        be refused at the lease."""
        if self._lost is None and not self._released and self.record is not None:
            record, problem = read_record(self.root)
            if not self.fence().matches(record):
                with self._mu:
                    self._lose(lost_message(str(self.root), record, problem, "this job will not restart"))
        return self._lost

    def release(self) -> None:
        """Remove the record if it is still ours, then drop the OS lock. Idempotent; never raises."""
        with self._mu:
            if self._released:
                return
            self._released = True
            self._stop.set()
            try:
                current, _ = read_record(self.root)
                if self._lost is None and self.record is not None and current is not None \
                        and current.token == self.record.token:
                    os.unlink(self.root / LEASE_RECORD)
                    fsync_dir(self.root)
            except OSError as e:
                log.warning("could not remove the lease record of %s: %s", self.root, e.strerror or e)
            self._close_fd()
        with _HELD_MU:
            if _HELD.get(os.path.realpath(self.root)) is self:
                del _HELD[os.path.realpath(self.root)]
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _abandon(self, why: str) -> None:
        with self._mu:
            self._lose(f"the lease of {self.root} was {why}")
            self._stop.set()
            self._close_fd()

    def _lose(self, why: str) -> None:
        """Record (and log, once) that the lease is lost. Caller holds ``_mu``."""
        if self._lost is None:
            self._lost = why
            log.error("%s", why)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the last descriptor of this open file: the flock goes with it
            self._fd = None
            self._locked = False


def _forget_in_child() -> None:
    """After ``fork`` (DataLoader workers) the child drops its copies of the lock descriptors (the lock dies
    with the holder, not its last child) and never renews or releases; no mutex: one may be held at the fork."""
    global _HELD_MU
    _HELD_MU = threading.Lock()
    for lease in _HELD.values():
        lease._mu, lease._released, lease._thread = threading.Lock(), True, None
        if lease._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lease._fd)  # close, never LOCK_UN: that would unlock the parent's open file too
            lease._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register  # registered at import, so it runs after a Session's own exit hook (which flushes, then releases)
def _release_all() -> None:
    for lease in list(_HELD.values()):
        lease.release()


def for_writer(root: str | os.PathLike[str], *, ttl: float, force: bool, run_id: str | None,
               launcher: tuple[str, int, int | None] | None) -> Lease | Fence:
    """What a job's committing process (rank 0) holds while it writes ``root`` (docs/FORMAT.md, "Lease").

    ``launcher``: (root, generation, pid) of the lease ``ftrain launch`` holds for this job; if it is for
    this root, the record must still name run ``run_id`` there (else :class:`LeaseError`), and the Fence is
    returned. Otherwise the lease is acquired (superseding an unclosed earlier Session of this process;
    taken over only if ``force``), renewed from a daemon thread, and returned: the caller releases it.
    """
    path = Path(root)
    if launcher is not None and run_id and _same_dir(launcher[0], path):
        fence = Fence(path, run_id, launcher[1], launcher[2])
        fence.verify()
        return fence
    lease = Lease(path, Owner.current(run_id, SESSION, supervised=bool(run_id)), ttl=ttl)
    lease.acquire(force=force, supersede=True)
    lease.start_renewal()
    return lease


def _same_dir(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False
