"""Shared contract (supervisor <-> workers): the files one attempt of a supervised job shares.

The directory ``<log_dir>/<run_id>/<host>/attempt-NNN/`` (heartbeats, error
files, stack dumps, per-rank logs, ``stop.json``, ``preempted.json``) is specified in
docs/FORMAT.md, "Attempt directory"; this module reads and writes it. Workers
find it in ``$FTRAIN_ATTEMPT_DIR``. Errors are data: the supervisor builds its
root-cause report from these files, not from log scraping alone.

The JSON files are read into frozen records (:class:`ErrorRecord`, :class:`PreemptedRecord`,
:class:`StopRecord`) that check every field's type once, here: a worker (or anything else able to write into
the directory) is untrusted input to the supervisor, which must never crash on what it finds. The same records
write the files, so both sides of the boundary share one definition of each.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftrain import envvars, exitcodes
from ftrain.errors import FtrainError

#: Phases a worker reports in its heartbeat. The hang detector gives each its own allowance.
STARTING, RESTORING, STEPPING, SAVING, EXITING = "starting", "restoring", "step", "saving", "exiting"
_HEARTBEAT_WIDTH = 80


@dataclass(frozen=True)
class Heartbeat:
    phase: str
    step: int
    time: float  # wall clock of the last write (same host as the supervisor)
    #: The writer's worker group (torchrun's TORCHELASTIC_RESTART_COUNT) and process id; None in lines
    #: written before these fields existed. Ranks are renumbered across groups, so in a multi-node launch
    #: the supervisor judges only heartbeats whose ``pid`` is a worker of the current group.
    group: int | None = None
    pid: int | None = None


def _fields(doc: object, kinds: Mapping[str, type]) -> dict[str, Any] | None:
    """The fields of the JSON object ``doc`` that ``kinds`` names, each either absent (null counts as absent) or of
    its kind; None if ``doc`` is not an object or a field has another type. A bool is not a number (JSON's true
    would pass for 1), a float must be finite (an int is read as a float), and keys not in ``kinds`` are ignored (a
    newer writer may add some)."""
    if not isinstance(doc, dict):
        return None
    out: dict[str, Any] = {}
    for key, kind in kinds.items():
        value = doc.get(key)
        if value is None:
            continue
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            try:
                value = float(value)
            except OverflowError:  # an integer of 400 digits
                return None
            if not math.isfinite(value):
                return None
        elif (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            return None
        out[key] = value
    return out


@dataclass(frozen=True)
class ErrorRecord:
    """``errors/rank-RRRRR.json``: a worker's uncaught exception (docs/FORMAT.md, "Attempt directory").

    Every field may be absent (older writers lack ``group``, ``permanent`` and ``exit_code``); a field of the wrong
    type makes the whole file unreadable (:meth:`from_json` gives None), and the supervisor skips it."""

    rank: int | None = None
    pid: int | None = None  # the writer's pid as torchrun knows it (``worker_pid``): attributes it to a group
    group: int | None = None
    host: str | None = None
    time: float | None = None  # the writer's wall clock: the earliest record is the root cause
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    #: ``FtrainError.permanent``: no restart can fix it, and the launch stops with ``exit_code``.
    permanent: bool = False
    exit_code: int | None = None

    @property
    def sort_time(self) -> float:
        """``time`` for ordering records: a record without one sorts first, as one from the epoch would."""
        return self.time if self.time is not None else 0.0

    @classmethod
    def from_json(cls, doc: object) -> ErrorRecord | None:
        fields = _fields(doc, _ERROR_KINDS)
        return cls(**fields) if fields is not None else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ERROR_KINDS: dict[str, type] = {"rank": int, "pid": int, "group": int, "host": str, "time": float, "exc_type": str,
                                 "message": str, "traceback": str, "permanent": bool, "exit_code": int}


@dataclass(frozen=True)
class PreemptedRecord:
    """``preempted.json``: the preemption checkpoint of ``step`` committed (docs/FORMAT.md, "Attempt directory").

    ``step`` is required (it is what the file says); the rest may be absent (older writers lack ``pid`` and
    ``group``; ``remote_time`` only with a remote tier). A file without a whole-number ``step``, or with a field of
    the wrong type, reads as no marker (:meth:`from_json` gives None)."""

    step: int
    rank: int | None = None
    time: float | None = None  # when it committed locally (the writer's wall clock)
    reason: str | None = None  # why the worker stopped (its preemption reason)
    pid: int | None = None  # the writer's pid: a marker counts only for the group that wrote it
    group: int | None = None
    remote_time: float | None = None  # when it became durable on the remote tier

    @classmethod
    def from_json(cls, doc: object) -> PreemptedRecord | None:
        fields = _fields(doc, _PREEMPTED_KINDS)
        return cls(**fields) if fields is not None and "step" in fields else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.remote_time is None:
            del out["remote_time"]  # absent, not null, without a remote tier (as FORMAT.md has always had it)
        return out


_PREEMPTED_KINDS: dict[str, type] = {"step": int, "rank": int, "time": float, "reason": str, "pid": int,
                                     "group": int, "remote_time": float}


@dataclass(frozen=True)
class StopRecord:
    """``stop.json``: the supervisor asks every worker to stop (docs/FORMAT.md, "Attempt directory").

    Its presence is what counts: content that does not parse, or has fields of the wrong type, reads as a record
    with neither field (still a stop)."""

    signal: str | None = None  # the signal's name, e.g. "SIGTERM"
    time: float | None = None  # the supervisor's wall clock when it acted on it

    @classmethod
    def from_json(cls, doc: object) -> StopRecord:
        fields = _fields(doc, {"signal": str, "time": float})
        return cls(**fields) if fields is not None else cls()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> object:
    """``path``'s JSON; raises OSError or ValueError (also for a hostile file nested too deep to parse)."""
    try:
        return json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None


def entry_pid() -> int | None:
    """In a warm worker (forked by the zygote: docs/FORMAT.md, "Warm starts (zygote)"), the pid of its entry
    process; None in any other process, the worker's own children included."""
    try:
        if int(os.environ.get(envvars.FORKED_PID, "")) == os.getpid():
            return int(os.environ[envvars.ENTRY_PID])
    except (KeyError, ValueError):
        pass
    return None


def worker_pid() -> int:
    """The pid torchrun and the supervisor know this worker by, written into its heartbeats and error files:
    its entry's in a warm worker (torchrun started the entry), its own otherwise."""
    return entry_pid() or os.getpid()


class AttemptFiles:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._mistakes_stamp: int | None = None
        self._mistakes: tuple[str, ...] = ()

    @classmethod
    def next_attempt(cls, log_dir: Path, run_id: str) -> tuple[int, AttemptFiles]:
        """The first unused attempt number of this run on this host, and its files.

        Numbering continues across relaunches with the same run id (after a
        preemption), so an attempt never sees an earlier launch's heartbeats.
        Per host: several nodes may share one log_dir on a shared filesystem. The directory is
        created here, so concurrent launches on one host never get the same number.
        """
        host_dir = log_dir / run_id / socket.gethostname()
        used = [int(p.name.removeprefix("attempt-")) for p in host_dir.glob("attempt-*")
                if p.name.removeprefix("attempt-").isdigit()] if host_dir.is_dir() else []
        n = max(used, default=-1) + 1
        while True:  # claimed by creating it: several nodes of one job on one host may share the log dir
            try:
                (host_dir / f"attempt-{n:03d}").mkdir(parents=True)
            except FileExistsError:
                n += 1
                continue
            return n, cls(host_dir / f"attempt-{n:03d}")

    def create(self) -> None:
        for sub in ("heartbeats", "errors", "stacks", "ranks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def heartbeat(self, rank: int) -> Path:
        return self.root / "heartbeats" / f"rank-{rank:05d}"

    def error(self, rank: int) -> Path:
        return self.root / "errors" / f"rank-{rank:05d}.json"

    def stacks(self, rank: int) -> Path:
        return self.root / "stacks" / f"rank-{rank:05d}.txt"

    def stack_sizes(self) -> dict[str, int]:
        """File name -> size of every stack dump file now (they are appended to)."""
        sizes = {}
        for path in (self.root / "stacks").glob("rank-*.txt"):
            try:
                sizes[path.name] = path.stat().st_size
            except OSError:
                pass
        return sizes

    @property
    def ranks_dir(self) -> Path:
        return self.root / "ranks"

    @property
    def torchrun_log(self) -> Path:
        return self.root / "torchrun.log"

    @property
    def preempted(self) -> Path:
        return self.root / "preempted.json"

    @property
    def stop(self) -> Path:
        return self.root / "stop.json"

    # ------------------------------------------------------------ heartbeats
    def read_heartbeats(self) -> dict[int, Heartbeat]:
        beats: dict[int, Heartbeat] = {}
        hb_dir = self.root / "heartbeats"
        if not hb_dir.is_dir():
            return beats
        for entry in os.scandir(hb_dir):
            try:
                rank = int(entry.name.removeprefix("rank-"))
                phase, step, stamp, *more = Path(entry.path).read_text().split()
                group, pid = (int(more[0]), int(more[1])) if len(more) >= 2 else (None, None)
                beats[rank] = Heartbeat(phase, int(step), float(stamp), group, pid)
            except (ValueError, OSError):
                continue  # being written for the first time, or not ours
        return beats

    # ---------------------------------------------------------------- errors
    def read_errors(self) -> dict[int, ErrorRecord]:
        """Rank (from the file name) -> its error record; files that cannot be read or are malformed are skipped."""
        out: dict[int, ErrorRecord] = {}
        err_dir = self.root / "errors"
        if not err_dir.is_dir():
            return out
        for path in sorted(err_dir.glob("rank-*.json")):
            try:
                rank = int(path.stem.removeprefix("rank-"))
                record = ErrorRecord.from_json(_read_json(path))
            except (ValueError, OSError):
                continue
            if record is not None:
                out[rank] = record
        return out

    def mistakes(self) -> tuple[str, ...]:
        """The messages of the permanent errors recorded so far (``write_error_file``): the console drops worker
        lines that repeat one, since the supervisor says it once. Cheap per call: re-read only when the errors
        directory changed (a record appears by rename)."""
        try:
            stamp = os.stat(self.root / "errors").st_mtime_ns
        except OSError:
            return ()
        if stamp != self._mistakes_stamp:
            self._mistakes_stamp = stamp
            self._mistakes = tuple(r.message for r in self.read_errors().values() if r.permanent and r.message)
        return self._mistakes

    def read_preempted(self) -> PreemptedRecord | None:
        """The final save's marker, or None: absent, unreadable or malformed."""
        try:
            return PreemptedRecord.from_json(_read_json(self.preempted))
        except (OSError, ValueError):
            return None

    def write_preempted(self, record: PreemptedRecord) -> None:
        """Worker side: the preemption checkpoint committed. Renamed into place: a reader sees all of it or none."""
        tmp = self.preempted.with_name("preempted.json.partial")
        tmp.write_text(json.dumps(record.to_json()))
        os.replace(tmp, self.preempted)

    # ------------------------------------------------------------------ stop
    def write_stop(self, signal_name: str, when: float) -> None:
        """Supervisor side: record that the job must stop (a preemption signal arrived at ``when``).

        Left for the whole attempt, so a worker that starts after the signal (torchrun still
        spawning, a rank still in rendezvous) sees it and saves at its first step. Renamed into
        place: a reader sees the whole file or none.
        """
        tmp = self.stop.with_name("stop.json.partial")
        tmp.write_text(json.dumps(StopRecord(signal_name, when).to_json()))
        os.replace(tmp, self.stop)

    def read_stop(self) -> StopRecord | None:
        """Worker side: the stop marker, or None if there is none (one failed open: cheap)."""
        try:
            data = self.stop.read_bytes()
        except OSError:
            return None
        try:
            doc: object = json.loads(data)  # bytes: invalid UTF-8 is a ValueError here, not in the read
        except (ValueError, RecursionError):
            doc = None
        # The file only appears whole (renamed into place), so its presence is what counts: content we
        # cannot parse (a newer writer?) still means stop.
        return StopRecord.from_json(doc)


class HeartbeatWriter:
    """Worker side: rewrites one fixed-width line in place (one pwrite, no fsync: only liveness matters)."""

    def __init__(self, path: Path, group: int = 0) -> None:
        # O_TRUNC: a rank number is reused by every worker group; a new writer starts a fresh line.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._last = 0.0
        self._phase = ""
        self._tail = f"{group} {worker_pid()}"

    def beat(self, phase: str, step: int, *, min_interval: float = 0.5) -> None:
        now = time.time()
        if phase == self._phase and now - self._last < min_interval:
            return  # throttled: a step loop may call this thousands of times a second
        line = f"{phase} {step} {now:.3f} {self._tail}".ljust(_HEARTBEAT_WIDTH - 1) + "\n"
        os.pwrite(self._fd, line.encode(), 0)
        self._last, self._phase = now, phase

    def close(self) -> None:
        os.close(self._fd)


def exit_code_of(exc: BaseException) -> int:
    """The exit code a worker leaves with after ``exc``: a permanent error's own (2 for bad input), else 1."""
    return exc.exit_code if isinstance(exc, FtrainError) and exc.permanent else exitcodes.FAILURE


def write_error_file(path: Path, rank: int, exc: BaseException, group: int = 0) -> None:
    """Record an uncaught exception as data for the supervisor's root-cause report (``group``: the worker group).

    ``permanent`` (with its ``exit_code``) marks a mistake no restart can fix (:attr:`FtrainError.permanent`):
    the supervisor stops on it at once."""
    record = ErrorRecord(
        rank=rank, pid=worker_pid(), group=group, host=socket.gethostname(), time=time.time(),
        exc_type=type(exc).__name__, message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        permanent=isinstance(exc, FtrainError) and exc.permanent, exit_code=exit_code_of(exc),
    )
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record.to_json()))
    os.replace(tmp, path)
