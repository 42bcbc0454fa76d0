"""The lease rules, pure: who holds a checkpoint root, and who may take it when (docs/FORMAT.md, "Lease").

:func:`decide` is the whole policy; ``ftrain.checkpoint.lease`` does the I/O
around it (the lock file, the record, the renewal). No I/O here except
:meth:`Owner.current`, which describes this process, and :func:`probe_process`,
the default view of other processes (``decide`` takes it as a parameter).
Everything is immutable, hence thread-safe.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import psutil

from ftrain.checkpoint.format import LEASE_LOCK, LEASE_RECORD
from ftrain.errors import printable

LEASE_VERSION = 1
#: Process start times (psutil, from /proc) are compared with this slack: boot-time rounding differs between
#: readers. A pid reused within it looks alive, which errs towards refusing, never towards two writers.
START_TIME_SLACK = 1.0
#: Record roles: held by ``ftrain launch`` for its whole job, or by a Session's rank 0.
LAUNCH, SESSION = "launch", "session"
FIX = ("stop that job, or pass --force / set checkpoint.lease.takeover: true to take the directory over; "
       "the other job then stops committing")

# ----------------------------------------------------------------------------- who
@dataclass(frozen=True)
class Owner:
    """A process that wants (or holds) a lease, and the run it works for.

    ``supervised``: ``run_id`` is the supervisor's (``ftrain launch``), so a
    Session-held record of the same run is an earlier attempt of this job.
    """

    host: str
    boot_id: str
    pid: int
    pid_start_unix: float
    run_id: str
    role: str
    supervised: bool = False

    @classmethod
    def current(cls, run_id: str | None, role: str, *, supervised: bool = False) -> Owner:
        run = run_id or f"session-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        return cls(socket.gethostname(), boot_id(), os.getpid(), psutil.Process().create_time(), run, role,
                   supervised)


def boot_id() -> str:
    """This boot of this host (Linux); a pid recorded before a reboot says nothing about today's processes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``lease.json`` (docs/FORMAT.md, "Lease"). ``token`` identifies one acquisition."""

    generation: int
    token: str
    role: str
    run_id: str
    host: str
    boot_id: str
    pid: int
    pid_start_unix: float
    acquired_unix: float
    renewed_unix: float
    ttl_seconds: float
    argv: str = ""
    previous: str = ""

    def to_bytes(self) -> bytes:
        return (json.dumps({"lease_version": LEASE_VERSION, **asdict(self)}, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Parse and type-check a record; ValueError naming the problem (a hostile file must not crash us)."""
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("lease_version") != LEASE_VERSION:
            raise ValueError(f"unknown lease_version {obj.get('lease_version')!r}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = obj.get(f.name, f.default)
            kind = type(f.default) if isinstance(f.default, str) else _TYPES[f.name]
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise ValueError(f"field {f.name!r}: expected {kind.__name__}")
            if isinstance(v, float) and not (math.isfinite(v) and 0 <= v < 1e11):
                raise ValueError(f"field {f.name!r}: {v!r} is not a time or duration")
            values[f.name] = v
        if not (0 < values["pid"] < 1 << 31 and 0 < values["generation"] < 1 << 62):
            raise ValueError("pid or generation out of range")
        return cls(**values)

    def holder(self) -> str:
        """``run R (pid P on host H)``, safe to print (the fields come from a file)."""
        return printable(f"run {self.run_id[:200]} (pid {self.pid} on host {self.host[:200]})")

    def since(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_unix))

    def same_process(self, me: Owner) -> bool:
        return (self.host, self.boot_id, self.pid) == (me.host, me.boot_id, me.pid) and \
            abs(self.pid_start_unix - me.pid_start_unix) <= START_TIME_SLACK


_TYPES: dict[str, type] = {"generation": int, "token": str, "role": str, "run_id": str, "host": str,
                           "boot_id": str, "pid": int, "pid_start_unix": float, "acquired_unix": float,
                           "renewed_unix": float, "ttl_seconds": float}


# ----------------------------------------------------------------------------- the rules (pure)
class ProcessState(Enum):
    ALIVE = "alive"
    GONE = "gone"
    REUSED = "reused"  # the pid runs, but a process started at another time: the owner is gone


def probe_process(pid: int, start_unix: float) -> ProcessState:
    """Whether the process recorded as (``pid``, started at ``start_unix``) still runs on this host."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:  # a zombie holds no lock and writes nothing
            return ProcessState.GONE
        created = p.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return ProcessState.GONE
    except psutil.Error:  # AccessDenied: it exists and we cannot tell more; assume it is the owner
        return ProcessState.ALIVE
    return ProcessState.REUSED if abs(created - start_unix) > START_TIME_SLACK else ProcessState.ALIVE


class Verdict(Enum):
    FREE = "free"              # no record, lock free: nobody holds it
    OWN = "own"                # the record names this very process (an earlier lease never released)
    DEAD = "dead"              # the owner ran on this host and its process is gone
    EXPIRED = "expired"        # an owner on another host stopped renewing for longer than its ttl
    SAME_RUN = "same_run"      # a Session-held record of an earlier attempt of this supervised run
    UNREADABLE = "unreadable"  # a damaged record, and no process holds the lock
    FORCED = "forced"          # --force / checkpoint.lease.takeover
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` says: ``message`` is the error (REFUSE) or the log line (a takeover)."""

    verdict: Verdict
    message: str = ""


def decide(record: LeaseRecord | None, *, now: float, me: Owner, locked: bool, force: bool,
           probe: Callable[[int, float], ProcessState], where: str, problem: str = "") -> Decision:
    """May ``me`` take the lease of ``where``? Pure: ``probe`` is its only view of other processes.

    ``record``: the current record (None: none, or unreadable, and then ``problem`` says why).
    ``locked``: ``me`` got the OS lock on ``lease.lock`` (False: a live process holds it, where flock works).
    First match wins:

    1. no record: free if the lock is ours, else refused (unless forced);
    2. the record names this very process and the lock is ours: an earlier lease of ours, taken;
    3. ``force``: taken from whoever holds it;
    4. a Session-held record of the same supervised run: an earlier attempt, taken;
    5. the lock is held by a live process: refused;
    6. same host: taken if the owner's process is gone (pid gone, reused, or the host rebooted), else refused
       (the lock was free, but flock may be a no-op on this filesystem: the record is trusted);
    7. another host: taken once its renewal is older than its ttl, else refused.
    """
    if record is None:
        what = f"no readable lease record ({problem})" if problem else "no lease record"
        if locked:
            return (Decision(Verdict.UNREADABLE, f"the lease record of {where} is unreadable ({problem}) and no "
                                                 f"process holds {LEASE_LOCK}: taking the directory over")
                    if problem else Decision(Verdict.FREE))
        if force:
            return Decision(Verdict.FORCED, f"taking over {where} (--force / checkpoint.lease.takeover) from the "
                                            f"process that holds its {LEASE_LOCK} ({what})")
        return Decision(Verdict.REFUSE, f"checkpoint dir {where} is in use by another job: a running process "
                                        f"holds {LEASE_LOCK} ({what}); {FIX}")
    who = f"{record.holder()}, generation {record.generation}"
    mine = record.same_process(me)
    if mine and locked:
        return Decision(Verdict.OWN, f"taking over {where} from an earlier lease of this process ({who}) that "
                                     "was never released")
    if force:
        return Decision(Verdict.FORCED, f"taking over {where} (--force / checkpoint.lease.takeover) from {who}, held "
                                        f"since {record.since()}; it stops committing")
    if me.supervised and me.role == SESSION and record.role == SESSION and record.run_id == me.run_id and not mine:
        return Decision(Verdict.SAME_RUN, f"taking over {where} from an earlier attempt of this run ({who})")
    if not locked:
        return _refuse(where, record, now)
    if record.host == me.host:
        if record.boot_id and me.boot_id and record.boot_id != me.boot_id:
            return Decision(Verdict.DEAD, f"taking over {where} from {who}: its host has rebooted since")
        state = probe(record.pid, record.pid_start_unix)
        if state is ProcessState.GONE:
            return Decision(Verdict.DEAD, f"taking over {where} from {who}: that process is gone")
        if state is ProcessState.REUSED:
            return Decision(Verdict.DEAD, f"taking over {where} from {who}: that process is gone (pid "
                                          f"{record.pid} now belongs to a process started at another time)")
        return _refuse(where, record, now)
    age = now - record.renewed_unix
    if age > record.ttl_seconds:
        return Decision(Verdict.EXPIRED, f"taking over {where} from {who}: not renewed for {age:.0f}s, longer "
                                         f"than its lease ttl of {record.ttl_seconds:g}s")
    return _refuse(where, record, now)


def _refuse(where: str, record: LeaseRecord, now: float) -> Decision:
    return Decision(Verdict.REFUSE, refusal(where, record, now))


def refusal(where: str, record: LeaseRecord | None, now: float) -> str:
    """The one-line "in use" error: who holds ``where`` since when, and the fix."""
    if record is None:  # another acquirer's record replaced ours, then vanished: it is being fought over
        return f"checkpoint dir {where} is in use by another job (its lease record changed as we took it); {FIX}"
    age = max(0.0, now - record.renewed_unix)
    return (f"checkpoint dir {where} is in use by another job: {record.holder()} since {record.since()} "
            f"(lease generation {record.generation}, renewed {age:.0f}s ago); {FIX}")


def lost_message(where: str, record: LeaseRecord | None, problem: str, doing: str) -> str:
    if record is not None:
        return f"lost the lease of {where} to {record.holder()} — {doing}"
    why = f"its record is unreadable ({problem})" if problem else f"its record {LEASE_RECORD} is gone"
    return f"lost the lease of {where}: {why} — {doing}"
