"""Shared contract (supervisor <-> workers): the files one attempt of a supervised job shares.

The directory ``<log_dir>/<run_id>/<host>/attempt-NNN/`` (heartbeats, error
files, stack dumps, per-rank logs, ``stop.json``, ``preempted.json``) is specified in
docs/FORMAT.md, "Attempt directory"; this module reads and writes it. Workers
find it in ``$FTRAIN_ATTEMPT_DIR``. Errors are data: the supervisor builds its
root-cause report from these files, not from log scraping alone.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
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
    def read_errors(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        err_dir = self.root / "errors"
        if not err_dir.is_dir():
            return out
        for path in sorted(err_dir.glob("rank-*.json")):
            try:
                out[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
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
            self._mistakes = tuple(str(r.get("message")) for r in self.read_errors().values()
                                   if r.get("permanent") is True and r.get("message"))
        return self._mistakes

    def read_preempted(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.preempted.read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ stop
    def write_stop(self, signal_name: str, when: float) -> None:
        """Supervisor side: record that the job must stop (a preemption signal arrived at ``when``).

        Left for the whole attempt, so a worker that starts after the signal (torchrun still
        spawning, a rank still in rendezvous) sees it and saves at its first step. Renamed into
        place: a reader sees the whole file or none.
        """
        tmp = self.stop.with_name("stop.json.partial")
        tmp.write_text(json.dumps({"signal": signal_name, "time": when}))
        os.replace(tmp, self.stop)

    def read_stop(self) -> dict[str, Any] | None:
        """Worker side: the stop marker's content, or None if there is none (one failed open: cheap)."""
        try:
            text = self.stop.read_text()
        except OSError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        # The file only appears whole (renamed into place), so its presence is what counts: content we
        # cannot parse (a newer writer?) still means stop.
        return record if isinstance(record, dict) else {}


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
    permanent = isinstance(exc, FtrainError) and exc.permanent
    record = {
        "rank": rank, "pid": worker_pid(), "group": group, "host": socket.gethostname(), "time": time.time(),
        "exc_type": type(exc).__name__, "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "permanent": permanent, "exit_code": exit_code_of(exc),
    }
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
