"""Multi-node launches: tell torchrun's worker groups apart, and why each one ended. Pure: no processes, no I/O.

In a multi-node launch (``ftrain launch --nnodes MIN:MAX``) one torchrun runs for the
whole launch and restarts its workers itself at every re-rendezvous (a node left, a
node joined, a local worker failed): each set of workers between two rendezvous is a
*worker group*. The supervisor sees a group as the set of torchrun's worker pids
(:class:`GroupWatch`) and, when every one of them is gone, asks :func:`classify_group`
why, from what the workers left in the attempt directory and torchrun's output:

1. the supervisor itself received a preemption signal: ``PREEMPTED`` (exit 75 path);
2. the hang detector named one of the group's ranks: ``HUNG`` (counted);
3. a local rank raised an exception that is not a communication failure
   (:func:`is_communication_failure`): ``FAILED`` (counted; the earliest is the root cause);
4. a local worker exited abnormally (torchrun's "failed (exitcode: N) ... (pid: P)" line)
   without an error file: killed by a signal (the OOM killer), or ``sys.exit(N)``: ``FAILED``;
5. otherwise a *membership change*, never counted: every local error is a communication
   failure (a peer node died: gloo "Connection closed by peer"), or torchrun stopped the
   workers with SIGTERM to admit a new node (the workers saved: ``preempted.json``), or
   the workers were stopped without any error at all;
6. but a group that left no trace at all (no error, no failed exit, no save) *finished* if
   torchrun itself exited 0 after it: every rank returned normally. Until torchrun exits
   (or starts the next group) such a group looks the same as one stopped for a
   re-rendezvous, so the caller says which it was (``finished``), if it knows.

Files are attributed to a group by the writer's pid (heartbeats, error files and
``preempted.json`` carry it, docs/FORMAT.md "Attempt directory"): ranks are renumbered
across groups, and torchrun's restart count does not change at a scale-up.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ftrain import exitcodes
from ftrain.attempt import ErrorRecord, PreemptedRecord
from ftrain.errors import PeerFailed
from ftrain.supervisor.report import exit_text

#: Exception types torch raises when a peer or the store went away (torch.distributed's errors).
#: (``PeerFailed``: ftrain's own "another rank failed" error, raised by the ranks that did not fail themselves.)
COMMUNICATION_TYPES = frozenset({"DistNetworkError", "DistBackendError", "DistStoreError", "ConnectionResetError",
                                 "ConnectionRefusedError", "ConnectionAbortedError", "BrokenPipeError",
                                 PeerFailed.__name__})
#: Message fragments of a lost peer, lower case. Measured with torch 2.13 gloo on CPU: a SIGKILLed peer node
#: makes the survivors' pending collective raise ``RuntimeError: [.../gloo/transport/tcp/pair.cc:553]
#: Connection closed by peer [127.0.0.1]:PORT``; a group whose peer died during setup raises ``RuntimeError:
#: Gloo connectFullMesh failed with [...] timed out connecting: SO_ERROR: Connection refused``.
COMMUNICATION_MESSAGES = ("connection closed by peer", "connection reset by peer", "broken pipe",
                          "connectfullmesh failed", "connection refused", "timed out connecting",
                          "socket closed", "connection reset")

_WORKER_EXIT = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


class Ending(enum.Enum):
    """Why a worker group ended."""

    MEMBERSHIP = "membership change"
    FINISHED = "finished"
    FAILED = "failed"
    HUNG = "hung"
    PREEMPTED = "preempted"

    @property
    def counted(self) -> bool:
        """Whether this ending is a local failure, counted against ``supervisor.max_restarts``."""
        return self in (Ending.FAILED, Ending.HUNG)


@dataclass(frozen=True)
class GroupEnd:
    """The verdict on one ended group: ``rank`` is the root-cause rank of a failure, if known."""

    ending: Ending
    detail: str
    rank: int | None = None


@dataclass(frozen=True)
class Group:
    """One worker group as the supervisor saw it: ``number`` counts groups in this launch from 0."""

    number: int
    pids: frozenset[int]
    started: float  # wall clock when its first worker was seen (the hang detector's startup allowance)


class GroupWatch:
    """Turns successive observations of torchrun's worker pids into group starts and ends.

    A group ends when none of its pids is a worker any more (torchrun stops all local workers
    before a re-rendezvous); a non-empty set of new pids then starts the next. Pids seen while a
    group still has a live worker join that group (torchrun starts its workers one by one).
    Not thread-safe; one per launch.
    """

    def __init__(self, first: int = 0) -> None:
        self.current: Group | None = None
        #: The number the next group gets (``first`` for the first: groups are numbered across torchruns).
        self.count = first

    def observe(self, pids: Iterable[int], now: float) -> tuple[Group | None, Group | None]:
        """Record torchrun's workers at ``now``: (the group that ended, the group that started), each or None."""
        live = frozenset(pids)
        ended = started = None
        cur = self.current
        if cur is not None and not cur.pids & live:
            ended, self.current = cur, None
        elif cur is not None and live - cur.pids:
            self.current = Group(cur.number, cur.pids | live, cur.started)
        if self.current is None and live:
            self.current = started = Group(self.count, live, now)
            self.count += 1
        return ended, started


def is_communication_failure(record: ErrorRecord) -> bool:
    """Whether an error file's record is a lost peer or store rather than a fault of this rank's own."""
    if record.exc_type in COMMUNICATION_TYPES:
        return True
    message = (record.message or "").lower()
    return any(fragment in message for fragment in COMMUNICATION_MESSAGES)


def parse_worker_exits(lines: Iterable[str]) -> dict[int, int]:
    """pid -> exit code of every worker torchrun reported as failed in ``lines`` (its output)."""
    exits: dict[int, int] = {}
    for line in lines:
        m = _WORKER_EXIT.search(line)
        if m:
            exits[int(m.group(3))] = int(m.group(1))
    return exits


def group_errors(errors: Mapping[int, ErrorRecord], pids: frozenset[int]) -> dict[int, ErrorRecord]:
    """The error files (rank -> record) written by the processes ``pids``; older groups' are left out."""
    return {rank: rec for rank, rec in errors.items() if rec.pid in pids}


def classify_group(pids: frozenset[int], errors: Mapping[int, ErrorRecord], exits: Mapping[int, int],
                   preempted: PreemptedRecord | None, *, signalled: bool = False,
                   hang: str | None = None, finished: bool | None = None, local_only: bool = False,
                   ranks: Mapping[int, int] | None = None) -> GroupEnd:
    """Why the group of worker processes ``pids`` ended (rules 1-6 of the module docstring).

    ``errors``: every error file of the attempt (rank -> record; only the group's own count);
    ``exits``: pid -> exit code of workers torchrun reported failed (:func:`parse_worker_exits`);
    ``preempted``: the attempt's ``preempted.json`` record, or None; ``signalled``: the supervisor
    itself received a preemption signal; ``hang``: the hang detector's verdict on this group;
    ``finished`` (rule 6): True if torchrun exited 0 after the group ended, False if it started another
    group (or failed), None if not known yet. Only a group that left no trace depends on it: asked with
    True, the verdict is ``FINISHED`` exactly when it does. ``local_only``: a single-node launch, where no
    membership changes: a lost peer is a local rank that died (rule 7). ``ranks``: pid -> rank, to name workers.

    7. On a single node, a group that rules 1-4 do not explain and that did not finish is ``FAILED``: its root
       cause is the first worker that left no error file (a rank killed by a signal: torchrun logs only the first
       failed exit it saw, often a peer's), else the earliest error.
    """
    if signalled:
        return GroupEnd(Ending.PREEMPTED, "the supervisor received a preemption signal")
    if hang:
        return GroupEnd(Ending.HUNG, f"hang: {hang}")
    mine = group_errors(errors, pids)
    local = {rank: rec for rank, rec in mine.items() if not is_communication_failure(rec)}
    if local:
        rank, rec = min(local.items(), key=lambda kv: kv[1].sort_time)
        return GroupEnd(Ending.FAILED, f"rank {rank} ({rec.exc_type}: {_first_line(rec.message)})", rank)
    erred = {rec.pid for rec in mine.values()}
    silent = {pid: code for pid, code in exits.items()
              if pid in pids and pid not in erred and code not in (0, exitcodes.PREEMPTED)}
    names = ranks or {}

    def who(pid: int) -> str:
        return f"rank {names[pid]}" if pid in names else f"worker pid {pid}"

    if silent:
        pid, code = min(silent.items())
        return GroupEnd(Ending.FAILED, f"{who(pid)} exited with {exit_text(code)} without an error file",
                        names.get(pid))
    saved = preempted is not None and preempted.pid in pids
    if local_only and not saved and (mine or finished is False):
        dead = sorted(pid for pid in pids if pid not in erred)
        if dead:
            lost = f"; the other ranks lost it ({_first_line(min(mine.values(), key=_time).message)})" \
                if mine else ""
            return GroupEnd(Ending.FAILED, f"{who(dead[0])} died without an error file (killed by a signal?){lost}",
                            names.get(dead[0]))
        if mine:
            rank, rec = min(mine.items(), key=lambda kv: _time(kv[1]))
            return GroupEnd(Ending.FAILED, f"rank {rank} ({rec.exc_type}: {_first_line(rec.message)})", rank)
    if mine:
        rank, rec = min(mine.items(), key=lambda kv: _time(kv[1]))
        return GroupEnd(Ending.MEMBERSHIP, f"a peer was lost (rank {rank}: {rec.exc_type}: "
                        f"{_first_line(rec.message)})")
    if preempted is not None and preempted.pid in pids:
        return GroupEnd(Ending.MEMBERSHIP, "torchrun stopped the workers for a re-rendezvous; they saved step "
                        f"{preempted.step}")
    if finished:
        return GroupEnd(Ending.FINISHED, "every worker exited 0, then torchrun exited 0")
    if finished is False:
        return GroupEnd(Ending.MEMBERSHIP, "torchrun stopped the workers for a re-rendezvous; they left no error "
                        "and no save")
    return GroupEnd(Ending.MEMBERSHIP, "the workers exited without an error or a save: torchrun stopped them for a "
                    "re-rendezvous, or they finished and torchrun waits for the other nodes to finish")


def _time(record: ErrorRecord) -> float:
    return record.sort_time


def _first_line(text: object, limit: int = 160) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


__all__ = ["Ending", "Group", "GroupEnd", "GroupWatch", "classify_group", "group_errors", "is_communication_failure",
           "parse_worker_exits"]
