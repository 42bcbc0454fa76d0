"""Shared contract (supervisor, workers, tools): the run's event log, ``<checkpoint.dir>/events/<run id>.jsonl``.

One JSON object per line, appended by every ``ftrain launch`` supervisor of the
run and by its workers (global rank 0 for the job's progress, each node's local
rank 0 for its start), read by ``ftrain status`` and ``ftrain goodput``. The
events and their fields are specified in docs/FORMAT.md, "Event log".

Why appending never blocks the training thread: :meth:`EventLog.emit` only
stamps the time and puts the fields on a ``SimpleQueue`` (a C call, reentrant,
so a signal handler may emit too); one daemon thread per process encodes and
writes them. A full disk, a vanished directory or a stuck filesystem stalls
only that thread: events beyond :data:`MAX_QUEUED` are dropped and counted,
and training goes on. Each batch of whole lines is one ``write`` on an
``O_APPEND`` descriptor, so lines of several processes never interleave on a
local filesystem.

Every kind of event is a member of :class:`Ev`: writers emit members, readers compare ``e["ev"]`` with
members, so a misspelt kind is an AttributeError at once instead of an event no reader ever matches.

Readers trust nothing in these files: a line that is not a JSON object with a
finite ``t`` and a string ``ev`` is skipped (a torn last line from a SIGKILL,
or a hostile file), and so are lines over :data:`MAX_LINE_BYTES`.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("ftrain")

#: The directory of event logs inside the checkpoint root.
EVENTS_DIR = "events"
#: Events kept in memory while the writer cannot keep up (or the disk is stuck) before new ones are dropped.
MAX_QUEUED = 10_000
#: Readers skip longer lines (a hostile file cannot make a reader hold one huge line).
MAX_LINE_BYTES = 64 * 1024
#: Readers stop after this many events per file (about 200 MB of lines).
MAX_EVENTS_PER_FILE = 2_000_000
#: Seconds between the ``progress`` events of global rank 0.
PROGRESS_SECONDS = 5.0


class Ev(str, enum.Enum):
    """The kind of an event: its ``ev`` field, one per row of docs/FORMAT.md's "Event log" table.

    A ``str`` mix-in, not ``enum.StrEnum`` (Python 3.11; ftrain supports 3.10): a member equals, and hashes like, its
    value, so ``event["ev"] == Ev.LAUNCH`` holds for an event read back from JSON, and a member written to JSON is
    its value: the on-disk format is the plain string. Readers keep kinds they do not know as plain strings.
    """

    # supervisor
    LAUNCH = "launch"
    ATTEMPT_START = "attempt_start"
    GROUP_START = "group_start"
    GROUP_END = "group_end"
    FAILURE = "failure"
    HANG = "hang"
    ATTEMPT_END = "attempt_end"  # no longer written (logs before 2026-12-08); still read
    BACKOFF = "backoff"
    SIGNAL = "signal"
    NOTICE = "notice"
    GIVE_UP = "give_up"
    LAUNCH_END = "launch_end"
    # worker
    SESSION_START = "session_start"
    RESTORE = "restore"
    FIRST_STEP = "first_step"
    PROGRESS = "progress"
    SAVE = "save"
    COMMITTED = "committed"
    UPLOADED = "uploaded"
    UPLOAD_FAILED = "upload_failed"
    PREEMPTED = "preempted"
    FINISHED = "finished"

    def __str__(self) -> str:  # the value, as StrEnum's (a plain Enum's would be "Ev.LAUNCH")
        return str(self.value)


def events_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / EVENTS_DIR


def log_path(root: str | os.PathLike[str], run_id: str) -> Path:
    # A run id becomes a file name: keep it to one path component.
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id).lstrip(".") or "run"
    return events_dir(root) / f"{safe}.jsonl"


def node_id(launcher_pid: int) -> str:
    """A node of the run: its host and its ``ftrain launch`` process (several may share a host)."""
    return f"{socket.gethostname()}/{launcher_pid}"


class EventLog:
    """Appends events to one file from a background thread; see the module docstring.

    ``path`` None: a log that drops everything (no checkpoint root, or events are off).
    ``base``: fields every event of this process carries (run, source, node, rank...).
    """

    def __init__(self, path: Path | None, **base: Any) -> None:
        self.path = path
        self.base = base
        self.dropped = 0
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._queued = 0  # emitted, not yet written (approximate across threads: only a bound)
        self._done = threading.Condition()
        self._written = 0
        self._emitted = 0
        self._thread: threading.Thread | None = None
        self._starting = threading.RLock()  # one writer thread, whichever threads emit first
        self._failed = False
        self._closed = False

    def emit(self, ev: Ev, **fields: Any) -> None:
        """Record event ``ev`` now; never blocks, never raises (safe in signal handlers)."""
        if self.path is None or self._closed:
            return
        if self._queued >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queued += 1
        self._emitted += 1
        self._queue.put({"t": time.time(), "ev": str(ev), **self.base, **fields})
        if self._thread is None:
            # Re-entrant: a signal handler (run by this same thread) may emit while the first emit starts it.
            with self._starting:
                if self._thread is None:
                    thread = self._thread = threading.Thread(target=self._run, name="ftrain-events", daemon=True)
                    thread.start()

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` s until everything emitted so far is written (or dropped); whether it was."""
        target = self._emitted
        deadline = time.monotonic() + timeout
        with self._done:
            while self._written < target and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Write what is queued (up to ``timeout`` s) and stop the writer; later events are dropped."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)

    # ---------------------------------------------------------------- writer
    def _run(self) -> None:
        fd: int | None = None
        while True:
            batch = [self._queue.get()]
            while True:  # whatever else is queued goes in the same write
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            lines = [e for e in batch if e is not None]
            if lines and not self._failed:
                try:
                    if fd is None:
                        assert self.path is not None
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    _write_all(fd, b"".join(_encode(e) for e in lines))
                except OSError as e:
                    # Once: the job must not fail, nor fill its log, because its event log cannot be written.
                    self._failed = True
                    log.warning("cannot write the event log %s (%s); events are dropped from now on, training "
                                "goes on", self.path, e.strerror or e)
            self._queued -= len(lines)
            with self._done:
                self._written += len(lines)
                self._done.notify_all()
            if stop:
                if fd is not None:
                    os.close(fd)
                return


def _encode(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ------------------------------------------------------------------ reading
def read_events(*roots: str | os.PathLike[str], homes: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Every well-formed event of every run under the ``roots``' event directories, oldest first.

    Several roots make one job-wide view (docs/FORMAT.md, "Event log": with node-local disks each node's
    supervisor writes its own node's log to its own disk). A file reached twice (one shared directory given
    twice, a bind mount) is read once, and an event found in two files (a copy of a node's log) counts once.
    ``homes``, if given, is filled with each node's roots: those whose logs hold its supervisor's events (where
    that node's attempt directories are, with node-local disks).
    """
    out: list[dict[str, Any]] = []
    files: set[tuple[int, int]] = set()
    for root in roots:
        directory = events_dir(root)
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.jsonl")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in files:
                files.add((st.st_dev, st.st_ino))
                found = list(read_file(path))
                out.extend(found)
                if homes is not None:
                    for node in {text(e, "node") for e in found if e.get("src") == "supervisor"}:
                        if str(root) not in homes.setdefault(node, []):
                            homes[node].append(str(root))
    if len(files) > 1:
        out = _distinct(out)
    out.sort(key=lambda e: e["t"])  # stable: one writer's events at the same instant keep their order
    return out


def _distinct(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` without repeats: one writer never stamps two events of one kind at the same instant."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for e in events:
        key = (e["t"], e["ev"], *(str(e.get(k)) for k in ("run", "node", "src", "pid", "rank", "step")))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def read_file(path: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The well-formed events of one file from byte ``offset`` (whole lines only)."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError:
        return
    with f:
        f.seek(offset)
        n = 0
        for raw in f:
            if n >= MAX_EVENTS_PER_FILE:
                return
            if len(raw) > MAX_LINE_BYTES or not raw.endswith(b"\n"):
                continue  # too long, or torn (still being written, or cut by a kill)
            event = parse_line(raw)
            if event is not None:
                n += 1
                yield event


def parse_line(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    t, ev = event.get("t"), event.get("ev")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not isinstance(ev, str):
        return None
    return event


def number(event: dict[str, Any], key: str) -> float | None:
    """Field ``key`` if it is a finite, plausible number (not a bool), else None: readers never trust a type."""
    v = event.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e12:
        return float(v)
    return None


def integer(event: dict[str, Any], key: str) -> int | None:
    v = event.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def text(event: dict[str, Any], key: str) -> str:
    """Field ``key`` if it is a string, else "" (unsanitised: printing it is the caller's business)."""
    v = event.get(key)
    return v if isinstance(v, str) else ""


class Tail:
    """Follows one event file: :meth:`new` returns the events appended since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._offset:  # replaced: start over
            self._offset = 0
        out: list[dict[str, Any]] = []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break  # a line being written: read it next time
                    self._offset += len(raw)
                    event = parse_line(raw) if len(raw) <= MAX_LINE_BYTES else None
                    if event is not None:
                        out.append(event)
        except OSError:
            pass
        return out


def process_start() -> float:
    """When this process started (wall clock): its share of startup began then, imports included.

    From how long ago it started (Linux: its start in clock ticks since boot against the uptime, 10 ms
    resolution), not psutil's create_time, which adds the boot time in whole seconds: up to a second off, enough
    to make one launch appear to start before the previous one ended.
    """
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return time.time()


__all__ = ["EVENTS_DIR", "Ev", "EventLog", "Tail", "events_dir", "log_path", "node_id", "read_events"]
