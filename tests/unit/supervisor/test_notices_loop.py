"""Notices in the supervisor's loops (single-node and multi-node), on fake time with a scripted notice watch.

The watch is a :class:`FakeWatch`: it delivers its notice when fake time reaches ``at`` (as a watcher thread
would), records when the supervisor asks for the acknowledgement and whether the final save's preempted.json
existed then, and must be stopped on every exit path.
"""
from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loop_fakes
import nodes_fakes
import pytest
from loop_fakes import WALL0, Rig, Script, _debug_states, _no_real_time_or_signals, states  # noqa: F401 (fixtures)
from nodes_fakes import G

from ftrain.checkpoint.format import step_dirname

from ftrain import exitcodes
from ftrain.config import NoticesConfig
from ftrain.supervisor.notices import Notice
from ftrain.supervisor.state import State
from ftrain.supervisor.stop import StopKind, StopRequest

AWS = Notice("aws", WALL0 + 120.0, "spot instance-action terminate at ...")


class FakeWatch:
    def __init__(self, schedule: Callable[[float, Callable[[], None]], None] | None, notice: Notice = AWS,
                 at: float = 2.0, drain: Path | None = None) -> None:
        self.schedule, self.notice, self.at, self.drain = schedule, notice, at, drain
        self.started = self.stopped = 0
        self.acks: list[bool] = []  # preempted.json existed when the ack was asked for
        self.marker: Callable[[], bool] = lambda: False
        self.deliver: Callable[[Notice], None] | None = None

    def drain_file(self) -> Path | None:
        return self.drain

    def start(self, deliver: Callable[[Notice], None]) -> None:
        self.started += 1
        self.deliver = deliver
        if self.schedule is not None:
            self.schedule(self.at, lambda: deliver(self.notice))

    def acknowledge(self) -> None:
        self.acks.append(self.marker())

    def stop(self) -> None:
        self.stopped += 1


def with_watch(rig: Rig, **kw: Any) -> FakeWatch:
    watch = FakeWatch(rig.clock.at, **kw)
    rig.sup._notices = watch  # type: ignore[assignment]
    watch.marker = lambda: any(rig.sup.log_dir.glob("run/*/attempt-*/preempted.json"))
    return watch


class TimedJob(loop_fakes.FakeJob):
    """Writes preempted.json as real workers do: with the commit ``time`` (and, if asked, ``remote_time``)."""

    remote: float | None = None

    def _group_exit(self, g: loop_fakes.FakeGroup, rc: int) -> None:
        if self.files.preempted.exists():
            marker = {**json.loads(self.files.preempted.read_text()), "time": self.clock.time()}
            if self.remote is not None:
                marker["remote_time"] = self.clock.time() + self.remote
            self.files.preempted.write_text(json.dumps(marker))
        super()._group_exit(g, rc)


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> type[TimedJob]:
    monkeypatch.setattr(loop_fakes, "FakeJob", TimedJob)
    return TimedJob


def test_a_notice_stops_like_a_signal_and_logs_the_deadline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            caplog: pytest.LogCaptureFixture,
                                                            timed: type[TimedJob]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, save_step=7, save_takes=1.0))
    watch = with_watch(rig)
    assert rig.run() == exitcodes.PREEMPTED
    [job] = rig.jobs
    assert [sig for _, sig in job.groups[0].signals_sent] == [int(signal.SIGTERM)]  # mapped to the first preemption signal
    assert job.groups[0].signals_sent[0][0] == pytest.approx(2.0, abs=0.11)
    assert json.loads(job.files.stop.read_text())["signal"] == "aws notice"
    assert rig.sup.stops == [StopRequest(StopKind.NOTICE, "aws notice")]
    assert states(caplog) == ["running", "stopping", "done"]
    assert watch.acks == [True] and watch.stopped == 1  # acknowledged once, after the final save's marker
    err = capsys.readouterr().err
    assert "aws notice: spot instance-action terminate at ...; deadline 2001-09-09T01:48:40Z (in 118s)" in err
    assert "aws notice: asked 2 worker(s) to save and exit" in err
    assert "final checkpoint at step 7 durable (local) at 2001-09-09T01:46:43Z, 117.0s before the deadline" in err
    assert "preempted (" in err and "exiting with code 75" in err


def test_the_remote_time_wins_when_the_marker_has_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      timed: type[TimedJob]) -> None:
    timed.remote = 200.0
    rig = Rig(tmp_path, Script(exit_at=None, save_step=3))
    with_watch(rig)
    assert rig.run() == exitcodes.PREEMPTED
    assert "final checkpoint at step 3 durable (remote) at" in (err := capsys.readouterr().err)
    assert "s AFTER the deadline" in err


def test_the_platforms_sigterm_after_a_notice_is_not_a_second_signal(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, save_step=4, save_takes=2.0, signals=((2.5, "SIGTERM"),)))
    with_watch(rig)
    assert rig.run() == exitcodes.PREEMPTED
    err = capsys.readouterr().err
    assert "stopping now" not in err and "final checkpoint at step 4" in err
    assert rig.sup.stops == [StopRequest.notice("aws notice"), StopRequest.signal("SIGTERM")]
    assert not rig.sup.stop_now()
    assert rig.jobs[0].kills == [(rig.jobs[0].ended_at, 0.0)]  # torn down after it saved, not killed before


def test_two_signals_after_a_notice_still_stop_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, save_takes=4.0, signals=((2.5, "SIGTERM"), (3.0, "SIGINT"))))
    watch = with_watch(rig)
    assert rig.run() == exitcodes.PREEMPTED
    assert "second signal (SIGINT): stopping now" in capsys.readouterr().err
    assert watch.acks == [] and watch.stopped == 1  # no final save: nothing acknowledged


def test_no_ack_when_the_grace_runs_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, on_preempt="ignore"))
    watch = with_watch(rig)
    assert rig.run() == exitcodes.PREEMPTED
    err = capsys.readouterr().err
    assert "grace period of 5s ran out" in err
    assert "aws notice: deadline 2001-09-09T01:48:40Z; no final checkpoint was committed after the notice" in err
    assert watch.acks == [] and watch.stopped == 1


def test_a_notice_during_backoff_stops_without_restarting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, Script(exit_at=1.0, rc=1), Script())  # no progress: it backs off
    (rig.ckpt_dir / step_dirname(5)).mkdir()  # from an earlier launch
    watch = with_watch(rig, at=1.3)
    assert rig.run() == exitcodes.PREEMPTED
    assert len(rig.jobs) == 1 and watch.stopped == 1
    err = capsys.readouterr().err
    assert "stopped by aws notice while waiting to restart" in err
    assert "(the newest checkpoint, step 5, was committed before it)" in err


def test_an_existing_drain_file_at_launch_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, notices=NoticesConfig(sources=["drain"], drain_file=str(tmp_path / "DRAIN")))
    (tmp_path / "DRAIN").touch()
    assert rig.sup._notices.drain_file() == tmp_path / "DRAIN"  # the real watch, built from the config
    assert rig.run() == exitcodes.PREEMPTED
    assert rig.jobs == [] and states(caplog) == ["done"]
    assert f"drain file {tmp_path / 'DRAIN'} exists: not starting the job; remove it" in capsys.readouterr().err


def test_the_default_drain_file_is_in_the_checkpoint_dir(tmp_path: Path) -> None:
    rig = Rig(tmp_path, notices=NoticesConfig(sources=["drain"]))
    assert rig.sup._notices.drain_file() is None
    (rig.ckpt_dir / "DRAIN").touch()
    assert rig.sup._notices.drain_file() == rig.ckpt_dir / "DRAIN"


def test_the_watch_is_stopped_when_the_loop_raises(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, raise_in_tree=True))
    watch = with_watch(rig, at=100.0)
    with pytest.raises(RuntimeError, match="psutil exploded"):
        rig.run()
    assert watch.stopped == 1 and rig.jobs[0].kills


def test_a_job_that_succeeds_stops_the_watch_and_never_acks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(exit_at=1.0))
    watch = with_watch(rig, at=100.0)
    assert rig.run() == exitcodes.OK
    assert (watch.started, watch.stopped, watch.acks) == (1, 1, [])


# ----------------------------------------------------------------------------- multi-node
def nodes_rig(tmp_path: Path, groups: list[G], at: float) -> tuple[nodes_fakes.Rig, FakeWatch]:
    rig = nodes_fakes.Rig(tmp_path, groups, None)
    due: list[tuple[float, Callable[[], None]]] = []
    watch = FakeWatch(lambda when, fn: due.append((when, fn)), at=at)
    watch.marker = lambda: any(rig.sup.log_dir.glob("run/*/attempt-*/preempted.json"))
    rig.sup._notices = watch  # type: ignore[assignment]
    real_sleep = rig.clock.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        for item in [d for d in due if d[0] <= rig.clock.now]:
            due.remove(item)
            item[1]()

    rig.clock.sleep = sleep  # type: ignore[method-assign]
    return rig, watch


def test_multinode_a_notice_stops_this_node_after_its_groups_final_save(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rig, watch = nodes_rig(tmp_path, [G(1.0, None, (10, 11), on_signal=True)], at=3.0)
    assert rig.sup.run() == exitcodes.PREEMPTED
    assert rig.sup.state is State.DONE
    assert watch.acks and all(watch.acks) and watch.stopped == 1
    err = capsys.readouterr().err
    assert "aws notice: asked 2 worker(s) of this node to save and exit" in err
    assert "stopped by aws notice: final checkpoint at step 99" in err
    assert "aws notice: deadline 2001-09-09T01:48:40Z; final checkpoint at step 99 (durable at an unknown time)" in err


def test_multinode_an_earlier_groups_marker_is_not_the_final_save(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Group 0 saved for a scale-up (its preempted.json stays); the notice then lands while group 1 runs and
    # ignores the signal: no final save, so no acknowledgement.
    rig, watch = nodes_rig(tmp_path, [G(1.0, 2.0, (10, 11), saved=5), G(3.0, None, (20, 21))], at=4.0)
    assert rig.sup.run() == exitcodes.PREEMPTED
    assert watch.acks == [] and watch.stopped == 1
    assert "no final checkpoint was committed after the notice" in capsys.readouterr().err
