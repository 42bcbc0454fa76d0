"""Worker side: the per-step decision, a pure function of what every rank agreed on at this step.

``Session.step`` gathers its inputs (the schedule, this rank's clock, signal
flag and background writer, reported metrics), makes the ranks agree on them in
one collective, and then every rank calls :func:`decide` with the same
arguments, so every rank takes the same action. Rules, in order:

1. a preemption on any rank: save this step and exit (75), even if the
   previous background save failed (the preemption checkpoint does not depend on it);
2. a background save failed on any rank: raise on every rank;
3. nothing due (the step schedule, the time schedule unless ``save_best_only``,
   a report that ranks among the best, early stopping firing): continue;
4. the previous save still in flight, ``when_busy: skip``, and only the schedule
   asks for this save: skip it (keep-best and early-stopping saves are never skipped);
5. otherwise: save.

No I/O, no clock, no collectives: unit-tested directly.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class StepAction(enum.Enum):
    CONTINUE = "continue"
    SAVE = "save"
    SKIP_BUSY = "skip"
    SAVE_AND_EXIT = "save_and_exit"
    RAISE_FAILED = "raise_failed"


@dataclass(frozen=True)
class StepInputs:
    """What the ranks agreed on at one step (flags are "true on any rank")."""

    step: int
    every_steps: int
    time_due: bool
    preempt: bool
    save_failed: bool
    busy: bool
    #: The agreed monitored value ranks among the best ``keep_best``.
    best_due: bool = False
    #: Early stopping fired at this step.
    stop_now: bool = False
    save_best_only: bool = False
    when_busy: str = "wait"


def time_due(now: float, last_save: float, every_seconds: float) -> bool:
    """Whether the time schedule asks for a save (this rank's view; the ranks agree on it afterwards)."""
    return every_seconds > 0 and now - last_save >= every_seconds


def decide(i: StepInputs) -> StepAction:
    """The action for this step (rules in the module docstring)."""
    if i.preempt:
        return StepAction.SAVE_AND_EXIT
    if i.save_failed:
        return StepAction.RAISE_FAILED
    step_due = i.every_steps > 0 and i.step % i.every_steps == 0
    scheduled = (step_due or i.time_due) and not i.save_best_only
    selection_due = i.best_due or i.stop_now
    if not (scheduled or selection_due):
        return StepAction.CONTINUE
    if i.busy and i.when_busy == "skip" and not selection_due:
        return StepAction.SKIP_BUSY
    return StepAction.SAVE
