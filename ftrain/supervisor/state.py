"""The supervisor's states and the only transitions between them that its loop may take.

::

    STARTING --> RUNNING --(exit 0, or decide() says stop)-------------------> DONE
       |            |--(crash / hang: decide() says restart)--> BACKOFF --> STARTING
       |            |                                              `--(signal while waiting)--> DONE
       |            `--(preemption signal forwarded)--> STOPPING --(saved and exited / killed)--> DONE
       `--(signal before the first job started)--------------------------------------------> DONE

The supervisor starts in STARTING (its first attempt needs no transition into it).
A transition outside :data:`TRANSITIONS` is a bug in the supervisor, never a
condition of the job, so it raises :class:`IllegalTransition` (a RuntimeError)
instead of being logged and ignored.
"""
from __future__ import annotations

import enum


class State(enum.Enum):
    """Where the supervisor's loop is. ``DONE`` is terminal."""

    STARTING = "starting"   # about to start (or starting) an attempt's job
    RUNNING = "running"     # the job runs; watching for exit, hangs and signals
    STOPPING = "stopping"   # a preemption signal was forwarded; waiting (up to the grace period) for the exit
    BACKOFF = "backoff"     # an attempt failed or hung and decide() said restart; waiting out the delay
    DONE = "done"           # run() is returning its exit code


#: Legal transitions: ``TRANSITIONS[old]`` is every state the loop may enter from ``old``.
#: Why each edge exists (and why some do not):
#:
#: * STARTING -> RUNNING: the attempt's job was started.
#: * STARTING -> DONE: a signal arrived before the first job was started (exit 75).
#: * RUNNING -> STOPPING: the first preemption signal was forwarded to the workers.
#: * RUNNING -> BACKOFF: the attempt crashed or hung and decide() said restart.
#: * RUNNING -> DONE: success, or decide() said stop (gave up, or preempted: a signal that arrived
#:   while the job was already exiting, or two signals at once, never passes through STOPPING).
#: * STOPPING -> DONE: the job saved and exited, finished anyway (exit 0: success), was killed at the
#:   second signal, or the grace ran out.
#:   There is no STOPPING -> BACKOFF: a job stopped by a signal is preempted, and a preempted job is
#:   never restarted by us (the scheduler decides when it runs again).
#: * BACKOFF -> STARTING: the delay is over; the next attempt starts.
#: * BACKOFF -> DONE: a signal arrived during the delay (exit 75, no restart).
#: * DONE -> nothing.
#:
#: No RUNNING -> STARTING: every restart waits in BACKOFF first, even with a zero delay.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.DONE}),
    State.RUNNING: frozenset({State.STOPPING, State.BACKOFF, State.DONE}),
    State.STOPPING: frozenset({State.DONE}),
    State.BACKOFF: frozenset({State.STARTING, State.DONE}),
    State.DONE: frozenset(),
}

#: The state a new supervisor is in.
INITIAL = State.STARTING


class IllegalTransition(RuntimeError):
    """The supervisor tried a transition not in :data:`TRANSITIONS`: a programming error."""


def check_transition(old: State, new: State) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`.

    A state never transitions to itself: re-entering the same state means the loop lost track of
    where it is.
    """
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.name for s in TRANSITIONS[old])) or "none (terminal)"
        raise IllegalTransition(f"illegal supervisor transition {old.name} -> {new.name} "
                                f"(allowed from {old.name}: {allowed})")


__all__ = ["INITIAL", "TRANSITIONS", "IllegalTransition", "State", "check_transition"]
