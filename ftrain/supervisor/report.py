"""The root cause of a failed attempt, and the one-screen report printed when the supervisor gives up.

The earliest failure is the root cause (later ranks usually die because the
first one left their collectives). Sources, best first: the worker's own error
file (exception type, message, traceback), then torchrun's "Root Cause" block
(rank, exit code or signal), then the hang detector's verdict.
"""
from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrain import exitcodes
from ftrain.attempt import ErrorRecord
from ftrain.errors import printable
from ftrain.supervisor.console import is_collective_error

_ROOT = re.compile(r"Root Cause \(first observed failure\)")
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)(?:\s*\(local_rank:\s*(\d+)\))?")
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


@dataclass
class Failure:
    attempt: int
    rank: int | None = None
    exit_code: int | None = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    hang: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: A permanent error (``FtrainError.permanent``) ended the attempt: the exit code the launch stops with.
    permanent: int | None = None

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the job"
        if self.hang:
            return f"hang: {self.hang}"
        parts = [who]
        if self.exit_code is not None:
            parts.append(f"exited with {exit_text(self.exit_code)}")
        if self.exc_type:
            parts.append(f"({self.exc_type}: {self.message})")
        return " ".join(parts)


def permanent_failure(attempt: int, errors: Mapping[int, ErrorRecord]) -> Failure | None:
    """The earliest error record marked permanent (docs/FORMAT.md, "Attempt directory"), as the attempt's root
    cause; None if there is none. Its exit code is the record's (2 or 1), anything else read as 1."""
    marked = [(rec.sort_time, rank) for rank, rec in errors.items() if rec.permanent]
    if not marked:
        return None
    rank = min(marked)[1]
    rec = errors[rank]
    code = rec.exit_code
    return Failure(attempt=attempt, rank=rank, exc_type=printable(rec.exc_type or "error"),
                   message=printable(" ".join((rec.message or "").split())), traceback=rec.traceback,
                   permanent=code if code in (exitcodes.FAILURE, exitcodes.USAGE) else exitcodes.FAILURE)


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def parse_torchrun_root_cause(lines: list[str]) -> tuple[int | None, int | None, int | None]:
    """(rank, local rank, exit code) from torchrun's ChildFailedError summary, if present."""
    rank = local = code = None
    for i, line in enumerate(lines):
        if _ROOT.search(line):
            for follow in lines[i + 1:i + 12]:
                if (m := _RANK.match(follow)) and rank is None:
                    rank = int(m.group(1))
                    local = int(m.group(2)) if m.group(2) is not None else None
                if (m := _EXIT.match(follow)) and code is None:
                    code = int(m.group(1))
    return rank, local, code


def parse_torchrun_failures(lines: list[str]) -> list[tuple[int, int | None, int]]:
    """(rank, local rank, exit code) of every failed worker torchrun's ChildFailedError summary lists."""
    out = []
    for i, line in enumerate(lines):
        if m := _RANK.match(line):
            for follow in lines[i + 1:i + 4]:
                if e := _EXIT.match(follow):
                    out.append((int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None,
                                int(e.group(1))))
                    break
    return out


def root_cause(attempt: int, torchrun_tail: list[str], errors: Mapping[int, ErrorRecord],
               hang: str | None, ranks_dir: Path | None = None) -> Failure:
    rank, local, code = parse_torchrun_root_cause(torchrun_tail)
    err0 = errors.get(rank) if rank is not None else None
    if err0 is not None and is_collective_error(err0.message or ""):
        # torchrun's "first observed" is whichever exit it saw first: a survivor whose collective failed because
        # this peer died may exit first (its DataLoader workers no longer hold the dead rank's sockets open).
        # A rank killed by a signal is the cause.
        killed = [f for f in parse_torchrun_failures(torchrun_tail) if f[2] < 0 and f[0] != rank]
        if killed:
            rank, local, code = killed[0]
    # A rank killed by a signal leaves no error file, and the ranks it strands in a collective raise
    # (and write error files) a moment later: then torchrun's first observed failure is the root cause.
    # Otherwise the earliest error file is: torchrun observes exits in batches and may name a bystander.
    if errors and (rank is None or code is None or code > 0):
        first = min(errors.items(), key=lambda kv: kv[1].sort_time)[0]
        if first != rank:
            rank, local, code = first, None, None
    failure = Failure(attempt=attempt, rank=rank, exit_code=code, hang=hang)
    if rank not in errors and local is not None and ranks_dir is not None:
        # No error file (the script exited non-zero without an uncaught exception, or died of a
        # signal): show the end of that rank's stderr instead.
        logs = sorted(ranks_dir.glob(f"*/attempt_*/{local}/stderr.log"))
        if logs:
            tail = logs[-1].read_text(errors="replace").rstrip().splitlines()[-8:]
            failure.traceback = "\n".join(tail) or None
    err = errors.get(rank) if rank is not None else None
    if err is not None:
        failure.exc_type = err.exc_type
        failure.message = err.message
        failure.traceback = err.traceback
    return failure


def format_report(reason: str, failures: list[Failure], attempts: list[str], log_dir: str,
                  newest_checkpoint: int | None) -> str:
    """At most ~30 lines: what gave up, the root cause with the tail of its traceback, each attempt, where logs are.

    A permanent error is one line: its message names the thing and the fix, and nothing was retried."""
    if failures and (first := failures[-1]).permanent is not None:
        return (f"ftrain launch: {first.message} [{first.exc_type} on rank {first.rank}; not restarted, no restart "
                f"can fix it; exit code {first.permanent}; logs in {log_dir}]")
    out = [f"ftrain launch: {reason}"]
    if failures:
        first = failures[-1]
        out.append(f"root cause (attempt {first.attempt}): {first.describe()}")
        if first.traceback:
            tb = [ln for ln in first.traceback.rstrip().splitlines() if ln.strip()]
            out.append("  traceback / stderr (last lines):")
            out.extend(f"    {ln}" for ln in tb[-12:])
    out.append("attempts:")
    out.extend(f"  {a}" for a in attempts[-8:])
    newest = f"step {newest_checkpoint}" if newest_checkpoint is not None else "none"
    out.append(f"newest valid checkpoint: {newest}")
    out.append(f"logs, error files and stack dumps: {log_dir}")
    return "\n".join(out)
