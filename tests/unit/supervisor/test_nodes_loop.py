"""The supervisor's multi-node loop (``groups.py`` over ``watch.py``, multi-node) driven by a scripted torchrun on fake time.

One :class:`NodeJob` is one torchrun for the whole launch: a timeline of worker groups (their pids) and what
the workers leave behind when a group ends (error files, preempted.json, checkpoints). Membership changes
must not be counted; local failures are counted and the policy stops the launch after max_restarts.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from nodes_fakes import G, Rig, _no_real_time_or_signals, crash, lost_peers  # noqa: F401 (the fixture)

from ftrain import envvars, exitcodes
from ftrain.supervisor.command import TORCHRUN_RESTARTS


def test_torchrun_runs_once_with_its_own_restarts_and_the_elastic_env(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [G(1.0, 3.0, (10, 11))], (3.5, 0))
    assert rig.sup.run() == exitcodes.OK
    cmd = rig.cmds[0]
    assert cmd[cmd.index("--max-restarts") + 1] == str(TORCHRUN_RESTARTS)
    assert rig.envs[0][envvars.ELASTIC] == "1" and rig.envs[0]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_fixed_size_multinode_is_not_elastic(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [G(1.0, 3.0, (10, 11))], (3.5, 0), nnodes=(2, 2))
    assert rig.sup.run() == exitcodes.OK
    assert envvars.ELASTIC not in rig.envs[0]


def test_membership_changes_are_not_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Node loss (peers lost), scale-up (saved on torchrun's SIGTERM), then a clean finish: more group ends than
    # max_restarts=0 allows failures, and still success.
    groups = [lost_peers(1.0, 3.0, (10, 11)), G(5.0, 8.0, (20, 21), saved=20), lost_peers(9.0, 11.0, (30, 31)),
              G(13.0, 16.0, (40, 41))]
    rig = Rig(tmp_path, groups, (16.0, 0), max_restarts=0)  # the last group ends with torchrun
    assert rig.sup.run() == exitcodes.OK
    err = capsys.readouterr().err
    assert err.count("membership change") == 3 and "local failure" not in err
    assert "torchrun stopped the workers for a re-rendezvous; they saved step 20" in err
    assert "worker group 3: 2 worker(s) started" in err


def test_a_normal_finish_reads_as_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The workers exit 0; torchrun follows half a second later (its exit barrier): not a membership change.
    rig = Rig(tmp_path, [G(1.0, 3.0, (10, 11))], (3.5, 0))
    assert rig.sup.run() == exitcodes.OK
    err = capsys.readouterr().err
    assert "worker group 0 finished (every worker exited 0, then torchrun exited 0)" in err
    assert "finished: all ranks finished" in err
    assert "membership" not in err and "re-rendezvous" not in err


def test_a_group_without_a_trace_is_judged_by_what_torchrun_does_next(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Group 0 leaves no trace and torchrun starts group 1: a re-rendezvous, said before group 1's start. Group 1
    # leaves no trace and torchrun starts nothing within _FINISH_WAIT: said then, with both possibilities.
    groups = [G(1.0, 3.0, (10, 11)), G(5.0, 8.0, (20, 21)), G(30.0, 32.0, (30, 31))]
    rig = Rig(tmp_path, groups, (32.5, 0))
    assert rig.sup.run() == exitcodes.OK
    err = capsys.readouterr().err
    first = ("worker group 0 ended: membership change (torchrun stopped the workers for a re-rendezvous; they left "
             "no error and no save); not counted as a failure; torchrun re-rendezvouses")
    assert first in err and err.index(first) < err.index("worker group 1: 2 worker(s) started")
    second = err.index("worker group 1 ended: membership change (the workers exited without an error or a save")
    assert second < err.index("worker group 2: 2 worker(s) started")
    assert "worker group 2 finished" in err and "local failure" not in err


def test_local_crashes_are_counted_and_stop_after_max_restarts(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    groups = [crash(1.0, 2.0, (10, 11)), lost_peers(3.0, 4.0, (20, 21)), crash(5.0, 6.0, (30, 31)),
              crash(7.0, 8.0, (40, 41)), G(9.0, None, (50, 51))]
    rig = Rig(tmp_path, groups, None, max_restarts=2)
    assert rig.sup.run() == exitcodes.FAILURE
    job = rig.jobs[0]
    assert job.killed and 8.0 <= job.killed[0] <= 8.0 + 1.0  # killed at the third local failure, not later
    err = capsys.readouterr().err
    assert "worker group 0 failed (rank 1 (ValueError: loss is nan)): local failure 1" in err
    assert "worker group 1 ended: membership change" in err
    assert "local failure 2" in err
    assert "ftrain launch: gave up: 3 attempts failed (supervisor.max_restarts=2)" in err
    assert "root cause (attempt 2): rank 1 (ValueError: loss is nan)" in err
    assert "group 1 membership change: a peer was lost" in err  # the report lists every group


def test_a_permanent_error_stops_this_node_at_once_with_its_code(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    message = "checkpoint step 5 does not fit module 'model': shape [8] vs [16]"
    groups = [G(1.0, 2.0, (10, 11), errors=((0, "StateMismatch", message), (1, "StateMismatch", message)),
                permanent=exitcodes.FAILURE), G(3.0, None, (20, 21))]
    rig = Rig(tmp_path, groups, None, max_restarts=5)
    assert rig.sup.run() == exitcodes.FAILURE
    assert rig.jobs[0].killed and rig.jobs[0].killed[0] <= 3.0  # before torchrun's next group
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if message in line]) == 1, err
    assert "StateMismatch on rank 0; not restarted" in err and "local failure" not in err


def test_a_hang_is_judged_per_group_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Group 0's heartbeats stop at t=2: hung after hang_timeout=5. Group 1 starts late (rendezvous): its startup
    # allowance counts from when its workers appeared, so it is not hung though older beats are stale.
    groups = [G(1.0, None, (10, 11), stall=2.0), G(30.0, 33.0, (20, 21))]
    rig = Rig(tmp_path, groups, (34.0, 0), max_restarts=1)
    assert rig.sup.run() == exitcodes.OK
    job = rig.jobs[0]
    assert [s for _, s in job.sigs] == [int(signal.SIGUSR2), int(signal.SIGKILL)]
    assert 7.0 - 1e-6 < job.sigs[0][0] <= 8.5  # (fake time sums 0.05 s polls: float noise)
    err = capsys.readouterr().err
    assert "hang detected in worker group 0" in err and "worker group 0 hung" in err and "local failure 1" in err
    assert "hang detected in worker group 1" not in err


def test_no_hang_verdict_while_torchrun_has_no_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 38 s in rendezvous > startup_timeout=10; then a group that has not beaten yet for 5 s (< startup_timeout) while
    # the same ranks' files still hold group 0's beats, 38 s stale: they are not its beats.
    groups = [G(1.0, 2.0, (10, 11)), G(40.0, 45.0, (20, 21), stall=40.0)]
    rig = Rig(tmp_path, groups, (45.0, 0))
    assert rig.sup.run() == exitcodes.OK
    assert "hang detected" not in capsys.readouterr().err


def test_a_signal_to_the_supervisor_is_preemption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, [G(1.0, None, (10, 11), on_signal=True)], None)
    rig.clock.now = 0.0
    real_sleep = rig.clock.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if rig.clock.now >= 3.0 and not rig.sup.stops:
            rig.sup.notify("SIGTERM")  # once: a second signal means "stop now"

    rig.clock.sleep = sleep  # type: ignore[method-assign]
    assert rig.sup.run() == exitcodes.PREEMPTED
    job = rig.jobs[0]
    assert job.killed and job.killed[0] < 3.0 + 5.0  # right after the group saved, before the grace ran out
    assert "stopped by SIGTERM: final checkpoint at step 99" in capsys.readouterr().err


def test_torchrun_failing_outside_a_group_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, [G(1.0, 3.0, (10, 11))], (4.0, 1))
    assert rig.sup.run() == exitcodes.FAILURE
    assert "torchrun exited with code 1 outside a worker group" in capsys.readouterr().err
