"""The supervisor's one loop over a running torchrun, for single-node and multi-node launches alike.

Like torch.distributed.elastic's agent, which runs one monitor loop whatever the role, the supervisor watches
every torchrun with :func:`watch`: a second stop signal kills at once; the first starts the grace period, leaves
the stop marker for workers that start later and asks every worker that handles the signal to save and exit
(again at each poll, for those that start later); the grace period's end kills. Everything else belongs to the
launch's :class:`Mode`: :class:`ftrain.supervisor.groups.GroupsWatch`, for single-node and multi-node launches
alike (one torchrun that restarts its worker groups; the mode classifies each group's end, kills this node's
workers at a hang, and ends the loop when the policy gives up or, on a single node, asks for a backoff).

The loop touches the supervisor only through its public members, and the job only through the
:class:`~ftrain.supervisor.job.Job` interface, so it runs on a fake clock and a scripted job in the unit tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ftrain.supervisor.state import State
from ftrain.supervisor.stop import StopKind

if TYPE_CHECKING:
    from ftrain.attempt import AttemptFiles
    from ftrain.supervisor.job import Job
    from ftrain.supervisor.supervisor import Supervisor

#: Seconds between polls of the job (signals, exit, the stop's progress): a stop is late by at most this.
POLL = 0.05


class Mode(Protocol):
    """What a launch watches in its torchrun, besides signals and the grace period (each hook called once a poll)."""

    #: Whether a poll still runs :meth:`check` after torchrun exited (to see how its last group ended), rather than
    #: ending the loop at once.
    checks_exit: bool

    def stop_requested(self, asked: int, note: str) -> bool:
        """The first stop signal: ``asked`` workers were signalled, ``note`` says if the stop marker could not be
        written. Say so; True ends the loop (torchrun is then killed): there is nothing to wait for."""
        ...

    def while_stopping(self, asked: int) -> bool:
        """A poll in the grace period, ``asked`` more workers signalled; True: every worker saved and left."""
        ...

    def check(self, rc: int | None, stopping: bool) -> bool:
        """A poll (``rc``: torchrun's exit code, None while it runs); True ends the loop."""
        ...


def watch(sup: Supervisor, job: Job, files: AttemptFiles, mode: Mode) -> None:
    """Poll ``job`` until ``mode`` or a stop ends the watch; torchrun may still run then (the caller kills it)."""
    clock = sup.clock
    grace_deadline: float | None = None
    while True:
        rc = job.poll()
        if rc is not None and not mode.checks_exit:
            return
        if sup.stop_now():
            last = next(s for s in reversed(sup.stops) if s.kind is StopKind.SIGNAL)
            sup.say(f"second signal ({last.name}): stopping now")
            job.kill_tree()
            return
        if sup.stops and grace_deadline is None:
            sup.set_state(State.STOPPING)
            # The grace period is the outside world's deadline: it starts now, not when our workers exist.
            grace_deadline = clock.monotonic() + sup.sup.grace_seconds
            # The marker first: a worker that starts from here on finds it, whatever the signal misses.
            note = sup.write_stop(files)
            if mode.stop_requested(job.signal_new_workers(sup.forward_signal()), note):
                job.kill_tree()
                return
        elif grace_deadline is not None:
            if mode.while_stopping(job.signal_new_workers(sup.forward_signal())):
                return
            if clock.monotonic() > grace_deadline:
                sup.say(f"grace period of {sup.sup.grace_seconds:g}s ran out: killing the job "
                        "(the previous checkpoint stays valid)")
                job.kill_tree()
                return
        if mode.check(rc, grace_deadline is not None) or rc is not None:
            return
        sup.journal.tick()
        clock.sleep(POLL)
