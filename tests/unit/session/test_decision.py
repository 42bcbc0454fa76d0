"""The per-step decision, without processes: every rule of ftrain.session.decision, and their order."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from ftrain.session.decision import StepAction, StepInputs, decide, time_due


BASE = StepInputs(step=7, every_steps=0, time_due=False, preempt=False, save_failed=False, busy=False)


def inputs(**kw: Any) -> StepInputs:
    return dataclasses.replace(BASE, **kw)


def test_nothing_due_continues() -> None:
    assert decide(inputs()) is StepAction.CONTINUE
    assert decide(inputs(step=7, every_steps=5)) is StepAction.CONTINUE


def test_step_and_time_schedules_save() -> None:
    assert decide(inputs(step=10, every_steps=5)) is StepAction.SAVE
    assert decide(inputs(time_due=True)) is StepAction.SAVE


def test_every_steps_zero_is_off_even_at_step_zero() -> None:
    assert decide(inputs(step=0, every_steps=0)) is StepAction.CONTINUE


def test_preemption_wins_over_everything_including_a_failed_save() -> None:
    for failed, busy, due in itertools.product([False, True], repeat=3):
        got = decide(inputs(preempt=True, save_failed=failed, busy=busy, time_due=due, when_busy="skip"))
        assert got is StepAction.SAVE_AND_EXIT


def test_failed_background_save_raises_before_any_new_save() -> None:
    assert decide(inputs(save_failed=True, step=10, every_steps=5)) is StepAction.RAISE_FAILED
    assert decide(inputs(save_failed=True)) is StepAction.RAISE_FAILED


def test_busy_with_skip_skips_only_scheduled_saves() -> None:
    assert decide(inputs(step=10, every_steps=5, busy=True, when_busy="skip")) is StepAction.SKIP_BUSY
    assert decide(inputs(step=10, every_steps=5, busy=True, when_busy="wait")) is StepAction.SAVE
    # Keep-best and early-stopping saves are never skipped: the best weights must reach the disk.
    assert decide(inputs(busy=True, when_busy="skip", best_due=True)) is StepAction.SAVE
    assert decide(inputs(busy=True, when_busy="skip", stop_now=True)) is StepAction.SAVE
    # Busy but nothing due: nothing to skip.
    assert decide(inputs(busy=True, when_busy="skip")) is StepAction.CONTINUE


def test_save_best_only_drops_scheduled_saves_but_not_selection_saves() -> None:
    assert decide(inputs(step=10, every_steps=5, save_best_only=True)) is StepAction.CONTINUE
    assert decide(inputs(time_due=True, save_best_only=True)) is StepAction.CONTINUE
    assert decide(inputs(best_due=True, save_best_only=True)) is StepAction.SAVE
    assert decide(inputs(stop_now=True, save_best_only=True)) is StepAction.SAVE


@pytest.mark.parametrize(("now", "last", "every", "due"), [
    (10.0, 0.0, 0.0, False),   # off
    (10.0, 0.0, 10.0, True),   # exactly due
    (9.99, 0.0, 10.0, False),
    (25.0, 10.0, 10.0, True),
])
def test_time_due(now: float, last: float, every: float, due: bool) -> None:
    assert time_due(now, last, every) is due
