"""The supervisor's loop on a single node (``Supervisor.run``: ``groups.py`` over ``watch.py``) driven by a scripted torchrun on fake time.

No processes and no real signals: each torchrun is a :class:`FakeJob` replaying :class:`Script` s as its
worker groups, writing the files real workers write (heartbeats, error files, stacks,
preempted.json, committed checkpoint directories); time is a :class:`FakeClock` whose ``sleep``
advances it; signals are injected through ``Supervisor.notify``. The real-process behaviour is
covered by tests/test_launch.py; these pin the loop's decisions exactly and run in milliseconds.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from loop_fakes import (EPS, NPROC, RESTART_TAKES, SIGTERM, SIGUSR1, SIGUSR2, WALL0, Rig, Script,  # noqa: F401
                        _debug_states, _no_real_time_or_signals, states)

from ftrain import envvars, exitcodes
from ftrain.checkpoint.format import step_dirname
from ftrain.errors import ConfigError, LeaseError, StateMismatch, UsageError
from ftrain.supervisor.hang import reports_progress
from ftrain.supervisor.job import _handles
from ftrain.supervisor.state import INITIAL, TRANSITIONS, IllegalTransition, State, check_transition
from ftrain.supervisor.stop import StopKind, StopRequest


# ------------------------------------------------------------------ state machine
EXPECTED_EDGES = {
    (State.STARTING, State.RUNNING), (State.STARTING, State.DONE),
    (State.RUNNING, State.STOPPING), (State.RUNNING, State.BACKOFF), (State.RUNNING, State.DONE),
    (State.STOPPING, State.DONE),
    (State.BACKOFF, State.STARTING), (State.BACKOFF, State.DONE),
}


def test_transition_table_is_exactly_the_documented_edges() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == EXPECTED_EDGES
    assert set(TRANSITIONS) == set(State) and INITIAL is State.STARTING


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_every_legal_edge_is_accepted_and_every_other_refused(old: State, new: State) -> None:
    if (old, new) in EXPECTED_EDGES:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
            check_transition(old, new)


def test_supervisor_refuses_an_illegal_transition(tmp_path: Path) -> None:
    sup = Rig(tmp_path).sup
    assert sup.state is State.STARTING
    sup.set_state(State.DONE)
    with pytest.raises(RuntimeError, match="DONE -> RUNNING"):
        sup.set_state(State.RUNNING)
    assert sup.state is State.DONE  # a refused transition changes nothing


# ------------------------------------------------------------------ restarts
def test_crash_after_progress_is_restarted_by_torchrun_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, Script(exit_at=2.0, rc=1, commits=((1.0, 10),), errors=((0, 5.0),)),
              Script(exit_at=1.0, commits=((0.5, 20),)))
    assert rig.run() == exitcodes.OK
    [job] = rig.jobs  # no new torchrun: it restarted the group itself
    assert len(rig.groups) == 2 and rig.gaps() == [pytest.approx(RESTART_TAKES, abs=0.051)]  # step 10 committed: no backoff
    assert job.kills == [(job.ended_at, 0.0)] and job.closed  # torn down once after its exit (stragglers)
    assert all(g.signals_sent == [] for g in rig.groups)  # never signalled
    assert job.forward_calls == 0 and not job.files.stop.exists()  # no stop marker without a signal
    err = capsys.readouterr().err
    assert ("worker group 0 failed (rank 0 (ValueError: rank 0 diverged)): local failure 1 "
            "(supervisor.max_restarts=3); torchrun restarts the workers at once (it made progress)") in err
    assert "finished: all ranks finished" in err
    assert states(caplog) == ["running", "done"]
    assert rig.sup.state is State.DONE


def test_a_crash_without_progress_backs_off_with_a_new_torchrun(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, Script(exit_at=2.0, rc=1, errors=((0, 5.0),)), Script(exit_at=1.0))
    assert rig.run() == exitcodes.OK
    first, second = rig.jobs
    assert (first.env[envvars.ATTEMPT], second.env[envvars.ATTEMPT]) != ("0", "0")
    assert first.files.root != second.files.root  # each torchrun gets fresh files
    # Killed at the check that saw the failure (every 0.1 s), before torchrun's own restart: no group wasted.
    assert len(rig.groups) == 2 and first.kills[0][0] - 2.0 < 0.11
    # no new checkpoint: k=1, d=1, delay = d/2 + 0.5*d/2 = 0.75, after the detection
    assert rig.gaps() == [pytest.approx(0.75, abs=0.11)] and rig.gaps()[0] >= 0.75
    err = capsys.readouterr().err
    assert "stopping torchrun, restarting in 0.8s (no progress since the previous failure)" in err
    assert states(caplog) == ["running", "backoff", "starting", "running", "done"]


def test_a_script_without_a_session_is_limited_by_max_restarts_alone(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # No heartbeats (a plain torchrun script): the supervisor cannot see its checkpoints, so every failure counts
    # as progress: restarted at once each time, and stopped by max_restarts, never by the crash-loop guard.
    plain = Script(exit_at=2.0, rc=1, silent=True)
    script = tmp_path / "plain.py"
    script.write_text("import torch.distributed as dist\n\ndist.init_process_group('gloo')\n")
    rig = Rig(tmp_path, *[plain] * 6, max_restarts=4, max_attempts_without_progress=2, startup_timeout_seconds=1.0)
    rig.sup.spec.script = str(script)
    rig.sup.reports = reports_progress(script)
    assert rig.run() == exitcodes.FAILURE
    assert len(rig.jobs) == 1 and len(rig.groups) == 5 and rig.gaps() == [pytest.approx(RESTART_TAKES, abs=0.051)] * 4
    err = capsys.readouterr().err
    assert "gave up: 5 attempts failed (supervisor.max_restarts=4)" in err and "crash loop" not in err


def test_a_job_whose_checkpoint_dir_was_taken_over_is_not_restarted(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    taken: list[str] = []
    rig = Rig(tmp_path, Script(exit_at=2.0, rc=1), Script(exit_at=1.0), lease_lost=lambda: taken[0] if taken else None)
    rig.clock.at(1.0, lambda: taken.append("run other took the lease over (--force)"))
    assert rig.run() == exitcodes.FAILURE
    assert len(rig.groups) == 1  # restarted workers would only be refused at the lease
    assert "not restarting: run other took the lease over (--force)" in capsys.readouterr().err


def test_backoff_with_random_jitter_stays_within_policy_bounds(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    random.seed(1234)
    rig = Rig(tmp_path, *[Script(exit_at=0.5, rc=3)] * 4, jitter=None, max_attempts_without_progress=0)
    assert rig.run() == exitcodes.FAILURE
    assert len(rig.groups) == 4 and len(rig.jobs) == 4  # exactly max_restarts=3 restarts, each after a backoff
    for gap, d in zip(rig.gaps(), [1.0, 2.0, 4.0], strict=True):  # doubling: no failure made progress
        assert d / 2 - EPS <= gap <= d + 0.11  # the delay, after the detection (every 0.1 s)
    err = capsys.readouterr().err
    assert "ftrain launch: gave up: 4 attempts failed (supervisor.max_restarts=3)" in err
    assert "root cause (attempt 3): rank 0 exited with code 3" in err


def test_hang_dumps_stacks_then_kills_the_workers_and_torchrun_restarts_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, stalls={1: 3.0}, commits=((1.0, 4),)), Script(exit_at=1.0))
    assert rig.run() == exitcodes.OK
    [job] = rig.jobs
    hung = rig.groups[0]
    [(asked_at, sig), (killed_at, kill)] = hung.signals_sent
    assert sig == SIGUSR2 and kill == int(signal.SIGKILL)  # the stack dump, then the workers' kill
    last_beat = 2.9  # rank 1's last poll before it stalled at 3.0
    assert last_beat + 5.0 < asked_at <= last_beat + 5.0 + 0.2  # hang_timeout after it, at a 0.1 s check
    assert job.tree_calls >= 5  # descendants remembered at every check before the kill
    assert killed_at == pytest.approx(asked_at)  # as soon as every rank's stacks are written (here at once)
    assert all(job.files.stacks(r).exists() for r in range(NPROC))
    assert rig.gaps() == [pytest.approx(RESTART_TAKES, abs=0.051)]  # step 4 committed: torchrun restarts the group
    err = capsys.readouterr().err
    assert re.search(r"hang detected in worker group 0: rank 1 made no progress for \d+s \(last: step at step 2; "
                     r"supervisor.hang_timeout_seconds=5\); dumping Python stacks", err)
    assert "worker group 0 hung (hang: rank 1 made no progress" in err
    assert states(caplog) == ["running", "done"]


@pytest.mark.parametrize("mute, wait", [((1,), 0.3), ((0, 1), 2.0)])
def test_a_rank_that_cannot_dump_its_stacks_delays_the_kill_only_briefly(tmp_path: Path, mute: tuple[int, ...],
                                                                         wait: float) -> None:
    # Once one rank's stacks are in, a silent one is given 0.3 s more; if none answers, the 2 s cap.
    rig = Rig(tmp_path, Script(exit_at=None, stalls={1: 3.0}, mute=mute), Script(exit_at=1.0))
    assert rig.run() == exitcodes.OK
    [(asked_at, _), (killed_at, _)] = rig.groups[0].signals_sent
    assert killed_at == pytest.approx(asked_at + wait, abs=0.051)


def test_ranks_that_never_report_are_hung_after_the_startup_allowance(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Judged from the group's start on the injected wall clock (a real-clock start would never time out).
    rig = Rig(tmp_path, Script(exit_at=None, stalls={0: 0.0, 1: 0.0}), Script(), startup_timeout_seconds=10.0)
    assert rig.run() == exitcodes.OK
    [(asked_at, sig), _] = rig.groups[0].signals_sent
    assert sig == SIGUSR2 and 10.0 < asked_at <= 10.3
    assert ("hang detected in worker group 0: 2 rank(s) never reported progress within "
            "supervisor.startup_timeout_seconds=10") in capsys.readouterr().err


def test_crash_loop_gives_up_with_a_root_cause_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crash = Script(exit_at=1.0, rc=1, errors=((1, 10.0), (0, 11.0)))  # rank 1 failed first; rank 0 stranded
    rig = Rig(tmp_path, crash, crash, crash, crash, max_restarts=10, max_attempts_without_progress=3)
    (rig.ckpt_dir / step_dirname(5)).mkdir()  # from an earlier launch: not progress
    assert rig.run() == exitcodes.FAILURE
    assert len(rig.groups) == 3 and len(rig.scripts) == 1
    # The backoffs (0.75, 1.5 s), each after the check that saw the failure (every 0.1 s).
    assert rig.gaps() == [pytest.approx(0.75, abs=0.11), pytest.approx(1.5, abs=0.11)]
    err = capsys.readouterr().err
    assert ("ftrain launch: crash loop: 3 attempts in a row committed no new checkpoint "
            "(supervisor.max_attempts_without_progress=3)") in err
    assert "root cause (attempt 2): rank 1 (ValueError: rank 1 diverged)" in err
    assert "    ValueError: rank 1 diverged" in err  # the traceback's last line
    assert "  group 2 failed: rank 1 (ValueError: rank 1 diverged); newest checkpoint: step 5" in err
    assert "newest valid checkpoint: step 5" in err
    assert f"logs, error files and stack dumps: {tmp_path / 'logs' / 'run'}" in err


def test_torchrun_dying_by_itself_is_a_failure_and_a_new_one_starts(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, commits=((1.0, 3),)), Script(exit_at=1.0))
    rig.clock.at(2.0, lambda: setattr(rig.jobs[0], "rc", -int(signal.SIGKILL)))  # the OOM killer took torchrun
    assert rig.run() == exitcodes.OK
    assert len(rig.jobs) == 2  # step 3 was new: at once, with a new torchrun
    assert "torchrun exited with signal SIGKILL outside a worker group; starting a new one at once" in \
        capsys.readouterr().err


@pytest.mark.parametrize("error, code", [
    (ConfigError("checkpoint.every_steps: invalid value -1; expected a value >= 0"), exitcodes.USAGE),
    (UsageError("the global batch of 64 cannot be split evenly over 3 ranks; run at 1, 2 or 4"), exitcodes.USAGE),
    (LeaseError("checkpoint dir /c is held by job j (pid 7); stop it or pass --force"), exitcodes.USAGE),
    (StateMismatch("checkpoint step 4 does not fit module 'model': shape [8] vs [16]"), exitcodes.FAILURE),
])
def test_a_permanent_error_stops_at_once_with_its_code_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], error: Exception, code: int) -> None:
    mistake = Script(exit_at=1.0, rc=1, errors=((0, 10.0), (1, 10.5)), raises=error)
    rig = Rig(tmp_path, mistake, Script(), max_restarts=10)
    assert rig.run() == code
    assert len(rig.jobs) == 1  # no restart: none can fix it
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if str(error) in line]
    assert len(said) == 1, err  # once, not per rank or attempt
    assert f"{type(error).__name__} on rank 0" in said[0] and "not restarted" in said[0]
    assert "root cause" not in err and "attempts:" not in err  # no report: the one line is the report


def test_a_permanent_error_on_a_later_attempt_stops_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crash = Script(exit_at=1.0, rc=1, errors=((1, 10.0),))
    mistake = Script(exit_at=1.0, rc=2, errors=((1, 10.0),), raises=ConfigError("bad value"))
    rig = Rig(tmp_path, crash, mistake, Script(), max_restarts=10)
    assert rig.run() == exitcodes.USAGE
    assert len(rig.jobs) == 2


# ------------------------------------------------------------------ signals
def test_signal_before_the_job_starts_exits_75_without_starting_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, Script(), early_signals=["SIGUSR1"])
    (rig.ckpt_dir / step_dirname(5)).mkdir()
    assert rig.run() == exitcodes.PREEMPTED
    assert rig.jobs == []
    assert ("preempted (stopped by SIGUSR1 before the job started); exiting with code 75. "
            "Relaunch the same command to resume from step 5") in capsys.readouterr().err
    assert states(caplog) == ["done"]


def test_signal_while_the_job_starts_is_forwarded_at_once(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, signal_on_start="SIGTERM", save_step=7), Script())
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert job.groups[0].signals_sent == [(0.0, SIGTERM)]
    err = capsys.readouterr().err
    assert ("preempted (stopped by SIGTERM: final checkpoint at step 7); exiting with code 75. Relaunch the same command to resume from step 7") in err


@pytest.mark.parametrize(("received", "forwarded"), [("SIGTERM", SIGTERM), ("SIGUSR1", SIGUSR1),
                                                     ("SIGINT", SIGTERM)])  # not a preemption signal: the first one
def test_preemption_while_running_forwards_the_signal_and_never_restarts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        received: str, forwarded: int) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, signals=((2.0, received),), save_step=20, save_takes=1.5), Script())
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    [(at, sig)] = job.groups[0].signals_sent
    assert sig == forwarded and 2.0 <= at <= 2.1 + EPS
    assert job.kills == [(job.ended_at, 0.0)] and job.ended_at == pytest.approx(at + 1.5, abs=0.11)
    assert (rig.ckpt_dir / step_dirname(20)).is_dir()
    assert len(rig.groups) == 1  # the saved workers exit 75: torchrun is stopped before it restarts them
    err = capsys.readouterr().err
    assert f"{received}: asked 2 worker(s) to save and exit within 5s" in err
    assert f"stopped by {received}: final checkpoint at step 20" in err and "resume from step 20" in err
    assert states(caplog) == ["running", "stopping", "done"]


def test_a_group_torchrun_restarts_after_the_final_save_is_killed_unreported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The saved workers exit 75, and torchrun restarts them faster than the supervisor's next look: the stopped
    # group is reported once, as preempted; the new one is killed with torchrun, never reported.
    rig = Rig(tmp_path, Script(exit_at=None, signals=((2.0, "SIGTERM"),), save_step=5), Script(exit_at=None))
    rig.restart_takes = 0.0
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert len(rig.groups) == 2 and rig.groups[1].ended_at == job.ended_at  # the restarted group died with torchrun
    err = capsys.readouterr().err
    assert err.count("ended: preempted") == 1 and "worker group 0 ended: preempted" in err, err
    assert "stopped by SIGTERM: final checkpoint at step 5" in err


def test_second_signal_kills_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, on_preempt="ignore", signals=((1.0, "SIGTERM"), (2.0, "SIGINT"))))
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert [sig for _, sig in job.groups[0].signals_sent] == [SIGTERM]  # the second is not forwarded: we kill
    assert job.kills[0] == (pytest.approx(2.0, abs=0.11), 0.0)  # long before the 5 s grace ran out
    err = capsys.readouterr().err
    assert "second signal (SIGINT): stopping now" in err
    assert "preempted (stopped by SIGTERM: no final checkpoint committed)" in err


def test_grace_expiry_kills_a_job_that_ignores_the_signal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Every rank goes silent at 1 s with a 2 s hang timeout: were hang detection on during the grace
    # period, it would fire (SIGUSR2) before the grace ran out.
    rig = Rig(tmp_path, Script(exit_at=None, on_preempt="ignore", signals=((1.0, "SIGTERM"),),
                               stalls={0: 1.0, 1: 1.0}), hang_timeout_seconds=2.0)
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert [sig for _, sig in job.groups[0].signals_sent] == [SIGTERM]
    killed_at = job.kills[0][0]
    assert 1.0 + 5.0 < killed_at <= 1.0 + 5.0 + 0.21
    err = capsys.readouterr().err
    assert "grace period of 5s ran out: killing the job (the previous checkpoint stays valid)" in err
    assert "preempted (stopped by SIGTERM: no final checkpoint committed)" in err
    assert states(caplog) == ["running", "stopping", "done"]


def test_workers_that_start_after_the_signal_are_signalled_when_they_appear(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # The signal arrives while torchrun is still being started: no worker exists to forward it to.
    rig = Rig(tmp_path, Script(exit_at=None, signal_on_start="SIGTERM", workers_at=(2.0, 3.0), save_step=1))
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    # Each rank exactly once, at the first poll it exists; polled all along while stopping.
    assert job.groups[0].stopped_at == {0: pytest.approx(2.0, abs=0.11), 1: pytest.approx(3.0, abs=0.11)}
    assert [sig for _, sig in job.groups[0].signals_sent] == [SIGTERM, SIGTERM] and job.forward_calls >= 30
    assert job.ended_at == pytest.approx(3.0 + 1.0, abs=0.21)  # saved and exited: never killed by the grace
    assert job.kills == [(job.ended_at, 0.0)]
    assert (rig.ckpt_dir / step_dirname(1)).is_dir()
    err = capsys.readouterr().err
    assert ("SIGTERM: asked 0 worker(s) to save and exit within 5s; the 2 not started (or not ready) yet are "
            "asked once they are") in err
    assert err.count("asked 1 more worker(s), started after the stop, to save and exit") == 2
    assert "stopped by SIGTERM: final checkpoint at step 1" in err
    assert states(caplog) == ["running", "stopping", "done"]


def test_stop_marker_is_written_and_reaches_workers_the_signal_never_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, on_preempt="marker", signals=((0.5, "SIGUSR1"),),
                               workers_at=(2.0, 2.0), save_step=3))
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert job.groups[0].signals_sent == []  # the ranks never handled the signal: only the marker reached them
    marker = json.loads(job.files.stop.read_text())
    assert marker == {"signal": "SIGUSR1", "time": pytest.approx(WALL0 + 0.5, abs=0.11)}  # the injected clock
    assert not job.files.stop.with_name("stop.json.partial").exists()  # renamed into place
    assert job.ended_at == pytest.approx(2.0 + 1.0, abs=0.21)
    assert "stopped by SIGUSR1: final checkpoint at step 3" in capsys.readouterr().err


def test_grace_counts_from_the_signal_not_from_when_the_workers_appear(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, on_preempt="ignore", signals=((1.0, "SIGTERM"),),
                               workers_at=(4.0, 4.0)))
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert job.groups[0].stopped_at == {0: pytest.approx(4.0, abs=0.11), 1: pytest.approx(4.0, abs=0.11)}
    assert 1.0 + 5.0 < job.kills[0][0] <= 1.0 + 5.0 + 0.21  # the cloud's deadline does not wait for our workers
    assert "grace period of 5s ran out" in capsys.readouterr().err


def test_a_job_that_finishes_after_the_signal_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # E.g. a relaunch of a run that had already finished: its workers restore the last step and exit 0
    # without ever reaching a step boundary where the stop would take effect.
    rig = Rig(tmp_path, Script(exit_at=2.0, rc=0, on_preempt="ignore", signals=((1.0, "SIGTERM"),)), Script())
    assert rig.run() == exitcodes.OK
    [job] = rig.jobs
    assert [sig for _, sig in job.groups[0].signals_sent] == [SIGTERM] and job.files.stop.exists()
    err = capsys.readouterr().err
    assert ("finished: all ranks finished (the job finished before the stop (SIGTERM) took effect: nothing to "
            "resume)") in err
    assert "preempted" not in err
    assert states(caplog) == ["running", "stopping", "done"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_the_real_job_signals_a_worker_only_once_it_handles_the_signal() -> None:
    # A fresh worker still importing torch has no handler yet: SIGTERM would kill it, not stop it cleanly.
    sig = signal.SIGWINCH  # harmless if it ever arrived; not one of the signals the fixture fakes
    previous = signal.signal(sig, signal.SIG_DFL)
    try:
        assert not _handles(os.getpid(), sig)
        signal.signal(sig, lambda *_: None)
        assert _handles(os.getpid(), sig)
    finally:
        signal.signal(sig, previous)
    assert not _handles(2**22 + 12345, sig)  # no such process (above the kernel's pid limit): nothing to signal


def test_signal_during_backoff_stops_without_restarting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, Script(exit_at=1.0, rc=1), Script())
    rig.clock.at(1.3, lambda: rig.sup.notify("SIGTERM"))  # attempt 0 ends at 1.0; the backoff is 0.75 s
    assert rig.run() == exitcodes.PREEMPTED
    assert len(rig.jobs) == 1 and rig.groups[0].signals_sent == []
    assert "preempted (stopped by SIGTERM while waiting to restart)" in capsys.readouterr().err
    assert states(caplog) == ["running", "backoff", "done"]


def test_signal_handler_feeds_notify(tmp_path: Path, _no_real_time_or_signals: dict[int, Any]) -> None:
    sup = Rig(tmp_path).sup
    sup._install_signal_handlers()
    assert set(_no_real_time_or_signals) == {SIGTERM, SIGUSR1, int(signal.SIGINT)}
    _no_real_time_or_signals[SIGUSR1](SIGUSR1, None)
    assert sup.stops == [StopRequest(StopKind.SIGNAL, "SIGUSR1")]


def test_an_exception_in_the_loop_still_tears_the_job_down(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, raise_in_tree=True))
    with pytest.raises(RuntimeError, match="psutil exploded"):
        rig.run()
    [job] = rig.jobs
    assert job.kills == [(0.0, 2.0)]  # the finally's graceful teardown, at the first check
