"""Tests for ftrain.supervisor.policy: the pure restart-or-stop decision."""
from __future__ import annotations

import math

import pytest

from ftrain import exitcodes
from ftrain.config import SupervisorConfig
from ftrain.supervisor.policy import (
    Action,
    AttemptResult,
    Decision,
    Outcome,
    RestartPolicy,
    attempts_without_progress,
    decide,
    restarts_used,
)

POLICY = RestartPolicy(max_restarts=3, max_attempts_without_progress=3,
                       backoff_seconds=1.0, backoff_max_seconds=30.0)
# Generous limits, so backoff tests are not cut short by a STOP.
ROOMY = RestartPolicy(max_restarts=100, max_attempts_without_progress=0,
                      backoff_seconds=1.0, backoff_max_seconds=30.0)
# Generous restart budget, so only crash-loop detection can stop it.
ROOMY_WITH_LOOP = RestartPolicy(100, 3, 1.0, 30.0)


def history(*attempts: tuple[Outcome, bool] | Outcome, detail: str = "") -> list[AttemptResult]:
    """Attempts numbered 0, 1, ...; a bare Outcome means no new checkpoint."""
    results = []
    for index, spec in enumerate(attempts):
        outcome, progress = spec if isinstance(spec, tuple) else (spec, False)
        results.append(AttemptResult(index, outcome, progress, exit_code=1, detail=detail))
    return results


def failures(n: int, progress: bool = False) -> list[AttemptResult]:
    return history(*[(Outcome.FAILED, progress)] * n)


# --- terminal outcomes -------------------------------------------------------------------------

def test_success_stops_ok() -> None:
    decision = decide(history(Outcome.FAILED, (Outcome.SUCCEEDED, True)), POLICY, 0.5)
    assert decision == Decision(Action.STOP, exitcodes.OK, 0.0, "attempt 1 succeeded")


def test_success_after_exhausted_budget_is_still_ok() -> None:
    # The budget only matters when there is something to restart.
    h = history(Outcome.FAILED, Outcome.FAILED, Outcome.FAILED, (Outcome.SUCCEEDED, True))
    decision = decide(h, POLICY, 0.0)
    assert (decision.action, decision.exit_code) == (Action.STOP, exitcodes.OK)


def test_preemption_stops_resumable() -> None:
    decision = decide(history(Outcome.PREEMPTED, detail="SIGTERM from the\nscheduler"), POLICY, 0.0)
    assert decision.action is Action.STOP
    assert decision.exit_code == exitcodes.PREEMPTED == 75
    assert decision.delay == 0.0
    assert "preempted" in decision.reason and "SIGTERM from the scheduler" in decision.reason
    assert "\n" not in decision.reason


def test_preemption_is_never_restarted_even_with_budget_left() -> None:
    decision = decide(history(Outcome.FAILED, Outcome.PREEMPTED), ROOMY, 0.0)
    assert (decision.action, decision.exit_code) == (Action.STOP, exitcodes.PREEMPTED)


# --- backoff -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("jitter", "expected"), [(0.0, 0.5), (1.0, 1.0), (0.5, 0.75)])
def test_first_restart_delay(jitter: float, expected: float) -> None:
    decision = decide(failures(1), POLICY, jitter)
    assert decision.action is Action.RESTART
    assert decision.exit_code == 0
    assert decision.delay == expected
    assert "restart 1 of 3" in decision.reason


@pytest.mark.parametrize(("n", "low", "high"), [
    (1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0), (5, 8.0, 16.0),
    (6, 15.0, 30.0),  # 32 capped at 30
    (7, 15.0, 30.0), (50, 15.0, 30.0),
])
def test_backoff_doubles_and_is_capped(n: int, low: float, high: float) -> None:
    assert decide(failures(n), ROOMY, 0.0).delay == low
    assert decide(failures(n), ROOMY, 1.0).delay == high


def test_huge_attempt_count_does_not_overflow() -> None:
    assert decide(failures(1500), RestartPolicy(10_000, 0, 1.0, 30.0), 1.0).delay == 30.0


def test_cap_below_base() -> None:
    policy = RestartPolicy(5, 0, backoff_seconds=10.0, backoff_max_seconds=4.0)
    assert decide(failures(1), policy, 0.0).delay == 2.0
    assert decide(failures(1), policy, 1.0).delay == 4.0


def test_zero_backoff_restarts_immediately() -> None:
    policy = RestartPolicy(5, 0, backoff_seconds=0.0, backoff_max_seconds=30.0)
    assert decide(failures(3), policy, 1.0).delay == 0.0


def test_progress_resets_the_exponent() -> None:
    # Three stalled failures would wait 4 s (jitter 1); a checkpoint in between resets it.
    stalled = history(Outcome.FAILED, Outcome.FAILED, Outcome.FAILED)
    assert decide(stalled, ROOMY, 1.0).delay == 4.0
    progressed = history(Outcome.FAILED, Outcome.FAILED, (Outcome.FAILED, True))
    assert decide(progressed, ROOMY, 1.0).delay == 0.0  # the first restart after progress is immediate
    one_after = history(Outcome.FAILED, (Outcome.FAILED, True), Outcome.FAILED)
    assert decide(one_after, ROOMY, 1.0).delay == 1.0
    two_after = history((Outcome.FAILED, True), Outcome.FAILED, Outcome.FAILED)
    assert decide(two_after, ROOMY, 1.0).delay == 2.0


def test_trailing_run_helpers() -> None:
    assert attempts_without_progress(history(Outcome.FAILED, (Outcome.FAILED, True))) == 0
    assert attempts_without_progress(history((Outcome.FAILED, True), Outcome.HUNG,
                                              Outcome.FAILED)) == 2
    assert attempts_without_progress(failures(4)) == 4
    assert restarts_used(failures(1)) == 0
    assert restarts_used(failures(4)) == 3


# --- giving up ---------------------------------------------------------------------------------

def test_exactly_max_restarts_restarts_are_allowed() -> None:
    # Progress each time, so only the restart budget can stop it.
    for n in (1, 2, 3):  # after attempts 0, 1, 2 fail: restarts 1, 2, 3
        decision = decide(failures(n, progress=True), POLICY, 0.0)
        assert decision.action is Action.RESTART, (n, decision)
        assert f"restart {n} of 3" in decision.reason
    decision = decide(failures(4, progress=True), POLICY, 0.0)  # 3 restarts used
    assert decision.action is Action.STOP
    assert decision.exit_code == exitcodes.FAILURE
    assert decision.delay == 0.0
    assert decision.reason == "gave up: 4 attempts failed (supervisor.max_restarts=3)"


def test_max_restarts_zero_never_restarts() -> None:
    policy = RestartPolicy(0, 3, 1.0, 30.0)
    decision = decide(history(Outcome.FAILED, detail="rank 2 exited with SIGKILL"), policy, 0.0)
    assert (decision.action, decision.exit_code) == (Action.STOP, exitcodes.FAILURE)
    assert decision.reason == ("gave up: 1 attempts failed (supervisor.max_restarts=0);"
                               " last: rank 2 exited with SIGKILL")


def test_crash_loop_detected() -> None:
    assert decide(failures(2), ROOMY_WITH_LOOP, 0.0).action is Action.RESTART
    decision = decide(failures(3), ROOMY_WITH_LOOP, 0.0)
    assert decision.action is Action.STOP
    assert decision.exit_code == exitcodes.FAILURE
    assert decision.reason == ("crash loop: 3 attempts in a row committed no new checkpoint"
                               " (supervisor.max_attempts_without_progress=3)")


def test_crash_loop_counts_only_the_trailing_run() -> None:
    # Five failures, but the third committed a checkpoint: only two in a row since.
    h = history(Outcome.FAILED, Outcome.FAILED, (Outcome.FAILED, True), Outcome.FAILED,
                Outcome.FAILED)
    assert decide(h, ROOMY_WITH_LOOP, 0.0).action is Action.RESTART
    h.append(AttemptResult(5, Outcome.HUNG, False))
    assert "crash loop: 3 attempts" in decide(h, ROOMY_WITH_LOOP, 0.0).reason


def test_crash_loop_detection_disabled_by_zero() -> None:
    decision = decide(failures(20), ROOMY, 0.0)
    assert decision.action is Action.RESTART
    assert decision.delay == 15.0


def test_max_restarts_checked_before_crash_loop() -> None:
    # Both limits are hit by the 4th stalled failure; the restart budget is reported.
    decision = decide(failures(4), RestartPolicy(3, 4, 1.0, 30.0), 0.0)
    assert "supervisor.max_restarts=3" in decision.reason


# --- hangs -------------------------------------------------------------------------------------

def test_hang_is_treated_like_failure() -> None:
    for n in (1, 2, 3, 4):
        hung = history(*[Outcome.HUNG] * n, detail="rank 1 made no progress for 300s")
        failed = history(*[Outcome.FAILED] * n)
        d_hung, d_failed = decide(hung, POLICY, 0.3), decide(failed, POLICY, 0.3)
        assert (d_hung.action, d_hung.exit_code, d_hung.delay) == (
            d_failed.action, d_failed.exit_code, d_failed.delay)
    restart = decide(history(Outcome.HUNG, detail="rank 1 made no progress"), POLICY, 0.0)
    assert restart.reason.startswith("attempt 0 hung: rank 1 made no progress; restart 1 of 3")


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("jitter", [-0.01, 1.01, math.nan, math.inf])
def test_invalid_jitter(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        decide(failures(1), POLICY, jitter)
    with pytest.raises(ValueError, match="jitter"):  # even where no delay is needed
        decide(history(Outcome.SUCCEEDED), POLICY, jitter)


def test_empty_history() -> None:
    with pytest.raises(ValueError, match="at least one attempt"):
        decide([], POLICY, 0.0)


def test_misnumbered_history() -> None:
    with pytest.raises(ValueError, match="history\\[1\\] is attempt 2"):
        decide([AttemptResult(0, Outcome.FAILED, False), AttemptResult(2, Outcome.FAILED, False)],
               POLICY, 0.0)


@pytest.mark.parametrize("field", ["max_restarts", "max_attempts_without_progress",
                                   "backoff_seconds", "backoff_max_seconds"])
def test_policy_rejects_negative_fields(field: str) -> None:
    kwargs: dict[str, float] = {"max_restarts": 1, "max_attempts_without_progress": 1,
                                "backoff_seconds": 1.0, "backoff_max_seconds": 1.0}
    kwargs[field] = -1
    with pytest.raises(ValueError, match=field):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


# --- config ------------------------------------------------------------------------------------

def test_from_config() -> None:
    assert RestartPolicy.from_config(SupervisorConfig()) == POLICY
    cfg = SupervisorConfig(max_restarts=7, max_attempts_without_progress=0,
                           backoff_seconds=0.5, backoff_max_seconds=8)
    assert RestartPolicy.from_config(cfg) == RestartPolicy(7, 0, 0.5, 8.0)


@pytest.mark.parametrize("code", [exitcodes.USAGE, exitcodes.FAILURE])
def test_a_permanent_error_stops_at_once_whatever_budget_is_left(code: int) -> None:
    mistake = AttemptResult(0, Outcome.FAILED, False, exit_code=1, detail="ConfigError: bad\nvalue", permanent=code)
    decision = decide([mistake], ROOMY, 0.5)
    assert decision == Decision(Action.STOP, code, 0.0, "not restarted (no restart can fix this): ConfigError: "
                                "bad value")
    # Only the last attempt counts: an earlier permanent failure followed by a plain one restarts as usual.
    later = AttemptResult(1, Outcome.FAILED, False, exit_code=1, detail="crash")
    assert decide([mistake, later], ROOMY, 0.5).action is Action.RESTART
