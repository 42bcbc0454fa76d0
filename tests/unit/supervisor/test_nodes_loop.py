"""The supervisor's multi-node loop (``groups.py`` over ``watch.py``, multi-node) driven by a scripted torchrun on fake time.

One :class:`NodeJob` is one torchrun for the whole launch: a timeline of worker groups (their pids) and what
the workers leave behind when a group ends (error files, preempted.json, checkpoints). Membership changes
must not be counted; local failures are counted and the policy stops the launch after max_restarts.
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ftrain import envvars, exitcodes
from ftrain.attempt import STEPPING, AttemptFiles
from ftrain.checkpoint.format import step_dirname
from ftrain.config import CheckpointConfig, FtrainConfig, SupervisorConfig
from ftrain.supervisor.command import TORCHRUN_RESTARTS, LaunchSpec
from ftrain.supervisor.supervisor import Supervisor

WALL0 = 1_000_000_000.0
GLOO_LOST = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        assert self.now < 5_000, "loop did not finish in fake time"


@dataclass(frozen=True)
class G:
    """One worker group: runs [start, end) with ``pids``; at its end leaves ``errors`` (rank, exc_type, message),
    a preempted.json from its first pid (``saved``), a committed ``commit`` step; ``stall``: stops heartbeating."""

    start: float
    end: float | None
    pids: tuple[int, ...]
    errors: tuple[tuple[int, str, str], ...] = ()
    saved: int | None = None
    commit: int | None = None
    stall: float | None = None
    on_signal: bool = False  # saves and exits 1 s after the supervisor forwards a signal
    permanent: int | None = None  # the errors are permanent ones (FtrainError.permanent), with this exit code


@dataclass
class NodeJob:
    rig: Rig
    groups: list[G]
    rc_at: tuple[float, int] | None
    files: AttemptFiles
    tail: list[str] = field(default_factory=list)
    pid: int = 4000
    rc: int | None = None
    killed: list[float] = field(default_factory=list)
    sigs: list[tuple[float, int]] = field(default_factory=list)
    signalled_at: float | None = None
    _done: set[int] = field(default_factory=set)

    def _now(self) -> float:
        return self.rig.clock.now

    def _live(self) -> G | None:
        t = self._now()
        for i, g in enumerate(self.groups):
            end = g.end if g.end is not None else float("inf")
            if g.on_signal and self.signalled_at is not None:
                end = min(end, self.signalled_at + 1.0)
            if g.start <= t < end and i not in self._done:
                return g
            if t >= end and i not in self._done:
                self.finish(i, g)
        return None

    def finish(self, i: int, g: G) -> None:
        self._done.add(i)
        for rank, exc_type, message in g.errors:
            rec = {"rank": rank, "pid": g.pids[rank % len(g.pids)], "group": i, "time": WALL0 + self._now(),
                   "exc_type": exc_type, "message": message, "traceback": f"{exc_type}: {message}"}
            if g.permanent is not None:
                rec.update(permanent=True, exit_code=g.permanent)
            self.files.error(rank).write_text(json.dumps(rec))
        if g.saved is not None or (g.on_signal and self.signalled_at is not None):
            step = g.saved if g.saved is not None else 99
            self.files.preempted.write_text(json.dumps({"step": step, "pid": g.pids[0]}))
        if g.commit is not None:
            (self.rig.ckpt_dir / step_dirname(g.commit)).mkdir(exist_ok=True)

    def poll(self) -> int | None:
        if self.rc is None:
            g = self._live()
            if g is not None:
                for rank, pid in enumerate(g.pids):
                    if g.stall is None or self._now() < g.stall:
                        line = f"{STEPPING} 1 {WALL0 + self._now():.3f} 0 {pid}".ljust(79) + "\n"
                        self.files.heartbeat(rank).write_text(line)
            if self.rc_at is not None and self._now() >= self.rc_at[0]:
                self.rc = self.rc_at[1]
        return self.rc

    def worker_pids(self) -> frozenset[int]:
        g = self._live() if self.rc is None else None
        return frozenset(g.pids) if g is not None else frozenset()

    def signal_workers(self, sig: int) -> int:
        self.sigs.append((self._now(), sig))
        g = self._live()
        if sig == int(signal.SIGKILL) and g is not None:  # the hung group dies; torchrun moves on
            i = self.groups.index(g)
            self.groups[i] = G(g.start, self._now(), g.pids)
        return len(g.pids) if g else 0

    def signal_new_workers(self, sig: int) -> int:
        if self.signalled_at is None:
            self.signalled_at = self._now()
            return 2
        return 0

    def kill_tree(self, *, graceful: float = 0.0) -> None:
        self.killed.append(self._now())
        if self.rc is None:
            self.rc = -9

    def tree(self) -> list[int]:
        return [self.pid]

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, tmp_path: Path, groups: list[G], rc_at: tuple[float, int] | None, *,
                 nnodes: tuple[int, int] = (1, 2), **supervisor: Any) -> None:
        self.clock = Clock()
        self.ckpt_dir = tmp_path / "ckpt"
        self.ckpt_dir.mkdir()
        knobs: dict[str, Any] = dict(warm_start=False, grace_seconds=5.0, hang_timeout_seconds=5.0, startup_timeout_seconds=10.0,
                                     max_restarts=2, max_attempts_without_progress=0)
        cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(self.ckpt_dir)),
                           supervisor=SupervisorConfig(**{**knobs, "log_dir": str(tmp_path / "logs"), **supervisor}))
        spec = LaunchSpec(script="train.py", script_args=[], nproc=2, torchrun_args=["--nnodes", "1:2"],
                          run_id="run", config=cfg, nnodes=nnodes)
        self.groups, self.rc_at = groups, rc_at
        self.jobs: list[NodeJob] = []
        self.cmds: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.sup = Supervisor(spec, echo=False, start_job=self.start, clock=self.clock, jitter=lambda: 0.5)

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, *,
              echo: Callable[[str], str] | None, warm: object = None) -> NodeJob:
        assert not self.jobs, "a multi-node launch starts torchrun once"
        self.cmds.append(cmd)
        self.envs.append(env)
        job = NodeJob(self, list(self.groups), self.rc_at, AttemptFiles(env[envvars.ATTEMPT_DIR]))
        self.jobs.append(job)
        return job


@pytest.fixture(autouse=True)
def _no_real_time_or_signals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def no_sleep(seconds: float) -> None:
        raise AssertionError("real time.sleep called")

    real = signal.signal
    ours = {int(getattr(signal, n)) for n in ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "SIGQUIT")}
    monkeypatch.setattr(time, "sleep", no_sleep)
    monkeypatch.setattr(signal, "signal", lambda s, h: signal.SIG_DFL if int(s) in ours else real(s, h))
    yield


def lost_peers(start: float, end: float, pids: tuple[int, ...], **kw: Any) -> G:
    return G(start, end, pids, errors=((0, "RuntimeError", GLOO_LOST), (1, "RuntimeError", GLOO_LOST)), **kw)


def crash(start: float, end: float, pids: tuple[int, ...], **kw: Any) -> G:
    return G(start, end, pids, errors=((1, "ValueError", "loss is nan"), (0, "RuntimeError", GLOO_LOST)), **kw)


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
        if rig.clock.now >= 3.0 and not rig.sup.signals:
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
