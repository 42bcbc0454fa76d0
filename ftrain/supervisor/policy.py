"""The restart policy: given what happened to each attempt so far, restart the job or stop.

Pure: no processes, no I/O, no clock and no global random state. Everything comes in as
arguments (the caller supplies ``jitter``), so every rule below is unit-testable.

Rules, applied to the last attempt in ``history``:

* An empty history is a caller bug: :class:`ValueError`.
* ``SUCCEEDED``: stop with ``exitcodes.OK``.
* ``PREEMPTED``: stop with ``exitcodes.PREEMPTED`` (75); the job is resumable and whoever
  preempted it (the scheduler) decides when it runs again, so we never restart it ourselves.
* ``FAILED`` with ``permanent`` set (a worker raised a mistake no restart can fix: bad config or
  usage, a directory held by another job, a checkpoint that does not fit the model): stop at once
  with that exit code (2 for bad input, 1 for a mismatch), whatever budget is left.
* ``FAILED`` or ``HUNG`` (a hang is handled exactly like a crash):

  1. restarts used = attempts - 1. If restarts used >= ``max_restarts``, stop with
     ``exitcodes.FAILURE``. So exactly ``max_restarts`` restarts are allowed
     (``max_restarts + 1`` attempts in all).
  2. Else, if ``max_attempts_without_progress`` > 0 and the trailing run of attempts that
     committed no new checkpoint is at least that long, stop with ``exitcodes.FAILURE``:
     a crash loop, where restarting again would only repeat the same failure.
  3. Else, if the last attempt made progress (committed a new checkpoint, or, for a script
     without ``ftrain.Session``, see ``AttemptResult.new_checkpoint``), restart at once: a job
     that makes progress between crashes loses nothing by restarting now, and every second of
     backoff is a second of lost goodput.
  4. Else restart after ``delay = d/2 + jitter * d/2`` ("equal jitter": never less than half
     the backoff, so ranks of many jobs restarting together spread out without restarting
     instantly), where ``d = min(backoff_max_seconds, backoff_seconds * 2 ** (k - 1))`` and
     ``k`` is the trailing run of attempts without progress (at least 1 here).
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftrain import exitcodes

if TYPE_CHECKING:  # only for the annotation; the policy needs nothing else from config
    from ftrain.config import SupervisorConfig


class Outcome(enum.Enum):
    """How one attempt of the job ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    PREEMPTED = "preempted"


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt (one run of the whole job) ended with.

    Invariant (checked by :func:`decide`): in a history, ``history[i].attempt == i``.
    """

    #: 0-based attempt number.
    attempt: int
    outcome: Outcome
    #: Did this attempt make progress: commit a checkpoint newer than any before it? For a script that never
    #: reports through ``ftrain.Session`` (no heartbeat) the supervisor cannot tell, and sets it True: the
    #: crash-loop guard and the backoff then leave it alone, and only ``max_restarts`` limits its restarts.
    new_checkpoint: bool
    #: Exit code of the job (torchrun), or None if it has none (killed: as hung, or once it had reported a failure).
    exit_code: int | None = None
    #: Human text, e.g. "rank 2 exited with SIGKILL".
    detail: str = ""
    #: A permanent error ended it (``FtrainError.permanent``): the exit code to stop with; None otherwise.
    permanent: int | None = None


class Action(enum.Enum):
    """What the supervisor does next."""

    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    """The policy's verdict.

    Invariants: RESTART has ``exit_code == 0`` and ``delay >= 0``; STOP has ``delay == 0``
    and ``exit_code`` is the supervisor's own exit code (see ``ftrain.exitcodes``).
    ``reason`` is one line.
    """

    action: Action
    exit_code: int
    delay: float
    reason: str


@dataclass(frozen=True)
class RestartPolicy:
    """The knobs of :func:`decide`; see ``SupervisorConfig`` for their meaning.

    Invariant: every field is >= 0 (checked here too, since tests and callers may build
    one directly rather than from a validated config).
    """

    max_restarts: int
    max_attempts_without_progress: int
    backoff_seconds: float
    backoff_max_seconds: float

    def __post_init__(self) -> None:
        for name in ("max_restarts", "max_attempts_without_progress",
                     "backoff_seconds", "backoff_max_seconds"):
            value = getattr(self, name)
            if not value >= 0:  # `not >=` also rejects NaN
                raise ValueError(f"RestartPolicy.{name} must be >= 0, got {value!r}")

    @classmethod
    def from_config(cls, cfg: SupervisorConfig) -> RestartPolicy:
        """The policy set by the ``supervisor`` config section."""
        return cls(
            max_restarts=cfg.max_restarts,
            max_attempts_without_progress=cfg.max_attempts_without_progress,
            backoff_seconds=cfg.backoff_seconds,
            backoff_max_seconds=cfg.backoff_max_seconds,
        )


def restarts_used(history: Sequence[AttemptResult]) -> int:
    """Restarts already spent: every attempt after the first was a restart.

    The one place the restart budget is counted; :func:`decide` and any log line that
    reports "restart N of M" must use it.
    """
    return max(len(history) - 1, 0)


def attempts_without_progress(history: Sequence[AttemptResult]) -> int:
    """Length of the trailing run of attempts that committed no new checkpoint."""
    run = 0
    for result in reversed(history):
        if result.new_checkpoint:
            break
        run += 1
    return run


def backoff_delay(history: Sequence[AttemptResult], policy: RestartPolicy, jitter: float) -> float:
    """Seconds to wait before the next restart (rules 3 and 4 of the module docstring)."""
    _check_jitter(jitter)
    k = attempts_without_progress(history)
    if k == 0:  # rule 3: the last attempt made progress
        return 0.0
    # Cap the exponent's effect before it overflows: beyond ~1000 doublings any positive
    # base exceeds every float cap, and 2.0 ** 1100 would raise OverflowError.
    growth = 2.0 ** min(k - 1, 1000)
    d = min(policy.backoff_max_seconds, policy.backoff_seconds * growth)
    return d / 2 + jitter * d / 2


def decide(history: Sequence[AttemptResult], policy: RestartPolicy, jitter: float) -> Decision:
    """Restart or stop after the last attempt in ``history`` (rules in the module docstring).

    ``history`` holds every attempt of this supervised run in order, the last one just
    ended. ``jitter`` is a caller-supplied number in [0, 1] (e.g. ``random.random()``).
    Raises ValueError for an empty or misnumbered history or a jitter out of range.
    """
    if not history:
        raise ValueError("decide() needs at least one attempt in history")
    for index, result in enumerate(history):
        if result.attempt != index:
            raise ValueError(f"history[{index}] is attempt {result.attempt}; "
                             f"attempts must be numbered 0, 1, 2, ... in order")
    _check_jitter(jitter)  # up front, so a bad caller fails on every path, not only on restarts

    last = history[-1]
    detail = " ".join(last.detail.split())  # detail is free text; keep the reason one line
    if last.outcome is Outcome.SUCCEEDED:
        return Decision(Action.STOP, exitcodes.OK, 0.0, f"attempt {last.attempt} succeeded")
    if last.outcome is Outcome.PREEMPTED:
        return Decision(Action.STOP, exitcodes.PREEMPTED, 0.0,
                        f"attempt {last.attempt} was preempted{_colon(detail)}; "
                        "resumable from the newest valid checkpoint")

    if last.outcome is Outcome.FAILED and last.permanent is not None:
        return Decision(Action.STOP, last.permanent, 0.0, f"not restarted (no restart can fix this){_colon(detail)}")
    used = restarts_used(history)
    last_words = f"; last: {detail}" if detail else ""
    if used >= policy.max_restarts:
        return Decision(Action.STOP, exitcodes.FAILURE, 0.0,
                        f"gave up: {len(history)} attempts failed "
                        f"(supervisor.max_restarts={policy.max_restarts}){last_words}")
    stalled = attempts_without_progress(history)
    limit = policy.max_attempts_without_progress
    if limit > 0 and stalled >= limit:
        return Decision(Action.STOP, exitcodes.FAILURE, 0.0,
                        f"crash loop: {stalled} attempts in a row committed no new checkpoint "
                        f"(supervisor.max_attempts_without_progress={limit}){last_words}")
    delay = backoff_delay(history, policy, jitter)
    return Decision(Action.RESTART, 0, delay,
                    f"attempt {last.attempt} {last.outcome.value}{_colon(detail)}; "
                    f"restart {used + 1} of {policy.max_restarts} in {delay:.1f}s")


def _check_jitter(jitter: float) -> None:
    if not 0.0 <= jitter <= 1.0:  # written this way round so NaN fails too
        raise ValueError(f"jitter must be in [0, 1], got {jitter!r}")


def _colon(detail: str) -> str:
    return f": {detail}" if detail else ""
