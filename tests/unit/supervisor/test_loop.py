"""The supervisor's loop on a single node (``Supervisor.run``: ``groups.py`` over ``watch.py``) driven by a scripted torchrun on fake time.

No processes and no real signals: each torchrun is a :class:`FakeJob` replaying :class:`Script` s as its
worker groups, writing the files real workers write (heartbeats, error files, stacks,
preempted.json, committed checkpoint directories); time is a :class:`FakeClock` whose ``sleep``
advances it; signals are injected through ``Supervisor.notify``. The real-process behaviour is
covered by tests/test_launch.py; these pin the loop's decisions exactly and run in milliseconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ftrain import envvars, exitcodes
from ftrain.attempt import STEPPING, AttemptFiles, write_error_file
from ftrain.checkpoint.format import step_dirname
from ftrain.config import CheckpointConfig, FtrainConfig, SupervisorConfig
from ftrain.errors import ConfigError, LeaseError, StateMismatch, UsageError
from ftrain.supervisor.job import _handles
from ftrain.supervisor.hang import reports_progress
from ftrain.supervisor.state import INITIAL, TRANSITIONS, IllegalTransition, State, check_transition
from ftrain.supervisor.command import TORCHRUN_RESTARTS
from ftrain.supervisor.supervisor import LaunchSpec, Supervisor

#: The fake wall clock at fake time 0. Far from the real time on purpose: a heartbeat compared
#: with the real ``time.time()`` instead of the injected clock would look decades stale (a hang).
WALL0 = 1_000_000_000.0
NPROC = 2
SIGTERM, SIGUSR1, SIGUSR2 = int(signal.SIGTERM), int(signal.SIGUSR1), int(signal.SIGUSR2)
EPS = 1e-6


# ----------------------------------------------------------------------------- fakes
class FakeClock:
    """Fake time: both clocks stand still until ``sleep`` advances them; callbacks run when they fall due."""

    def __init__(self, limit: float = 10_000.0) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._due: list[tuple[float, Callable[[], None]]] = []
        self._limit = limit  # a loop that never ends fails fast instead of spinning

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL0 + self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, f"negative sleep {seconds}"
        self.sleeps.append(seconds)
        self.now += seconds
        assert self.now < self._limit, "supervisor loop did not finish in fake time"
        for due in [d for d in self._due if d[0] <= self.now]:
            self._due.remove(due)
            due[1]()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` once fake time reaches ``when`` (checked after every sleep)."""
        self._due.append((when, fn))


@dataclass(frozen=True)
class Script:
    """What one worker group does; times are seconds after the group started."""

    exit_at: float | None = 1.0                 # its workers exit by themselves then (None: run until stopped)
    rc: int = 0                                 # with this code (0: torchrun exits 0 after them; else it restarts)
    stalls: dict[int, float] = field(default_factory=dict)  # rank -> when it stops heartbeating
    commits: tuple[tuple[float, int], ...] = ()  # (when, step): a checkpoint committed
    errors: tuple[tuple[int, float], ...] = ()   # (rank, error time) error files written at exit
    raises: BaseException | None = None          # what those ranks raised (default: a ValueError of their own)
    silent: bool = False                         # writes no heartbeat: a script without ftrain.Session
    signals: tuple[tuple[float, str], ...] = ()  # (when, name) signals delivered to the supervisor
    signal_on_start: str | None = None           # a signal that arrives while torchrun is being started
    # "save": once every rank got the signal, final save, preempted.json, exit 75; "marker": the ranks never
    # handle the signal (signal_new_workers skips them) but, once all started, see stop.json and save; "ignore"
    on_preempt: str = "save"
    workers_at: tuple[float, ...] = (0.0,) * NPROC  # when each rank's process appears (and handles signals)
    save_step: int = 0
    save_takes: float = 1.0
    tail: tuple[str, ...] = ()                   # torchrun's output lines when the group ends
    mute: tuple[int, ...] = ()                   # ranks that write no stacks when asked (SIGSTOPped, say)
    raise_in_tree: bool = False                  # tree() raises: an exception inside the loop


#: Seconds torchrun takes from a failed group to the next one's workers (its monitor interval, stopping the
#: survivors, the re-rendezvous): the supervisor's policy has decided before then (it checks every 0.1 s).
RESTART_TAKES = 0.3


@dataclass
class FakeGroup:
    """One worker group of a :class:`FakeJob`, replaying its :class:`Script`, and what it was asked."""

    number: int
    script: Script
    started: float
    pids: tuple[int, ...]
    ended_at: float | None = None
    rc: int | None = None
    signals_sent: list[tuple[float, int]] = field(default_factory=list)  # (fake time, signal) reaching a worker
    stopped_at: dict[int, float] = field(default_factory=dict)           # rank -> when signal_new_workers got it
    preempted_at: float | None = None
    pending: list[tuple[float, str]] = field(default_factory=list)
    committed: set[int] = field(default_factory=set)


class FakeJob:
    """A torchrun that replays :class:`Script` s as its worker groups, in order: when a group's workers fail, it
    starts the next script's group :data:`RESTART_TAKES` later (torchrun's own restart); when they exit 0, it
    exits 0. A kill ends it, and the supervisor's next torchrun (after a backoff) goes on with the next script.
    Unscripted restarts run until stopped. It writes the files real workers write (heartbeats, error files,
    stacks, preempted.json, committed checkpoint directories) and records what the supervisor asked of it."""

    def __init__(self, rig: Rig, env: dict[str, str], log_path: Path) -> None:
        self.rig, self.clock = rig, rig.clock
        self.files = AttemptFiles(env[envvars.ATTEMPT_DIR])
        self.env, self.log_path = env, log_path
        self.started = self.clock.now
        self.pid = 4000 + 100 * len(rig.jobs)
        self.tail: list[str] = []
        self.rc: int | None = None
        self.ended_at: float | None = None
        self.forward_calls = 0
        self.kills: list[tuple[float, float]] = []         # (fake time, graceful)
        self.tree_calls = 0
        self.closed = False
        self.groups: list[FakeGroup] = []
        self.restart_at: float | None = None
        self._start_group()

    @property
    def current(self) -> FakeGroup | None:
        g = self.groups[-1] if self.groups else None
        return g if g is not None and g.ended_at is None else None

    def _start_group(self) -> None:
        script = self.rig.scripts.pop(0) if self.rig.scripts else Script(exit_at=None)
        number = len(self.rig.groups)
        g = FakeGroup(number, script, self.clock.now, tuple(self.pid + 10 * (len(self.groups) + 1) + r
                                                            for r in range(NPROC)), pending=sorted(script.signals))
        self.groups.append(g)
        self.rig.groups.append(g)
        self.restart_at = None
        for rank in range(NPROC):  # each rank's Session opens its stack file at its start
            self.files.stacks(rank).touch()

    def poll(self) -> int | None:
        if self.rc is None:
            if self.restart_at is not None and self.clock.now >= self.restart_at:
                self._start_group()
            g = self.current
            if g is not None:
                self._act(g, self.clock.now - g.started)
        return self.rc

    def _act(self, g: FakeGroup, t: float) -> None:
        s = g.script
        for when, step in s.commits:
            if when <= t:
                self._commit(g, step)
        for rank in range(NPROC if not s.silent else 0):
            if t < s.stalls.get(rank, math.inf) and t >= s.workers_at[rank]:
                line = f"{STEPPING} {int(t)} {self.clock.time():.3f} {g.number} {g.pids[rank]}".ljust(79) + "\n"
                self.files.heartbeat(rank).write_text(line)
        while g.pending and g.pending[0][0] <= t:
            self.rig.sup.notify(g.pending.pop(0)[1])
        if (s.on_preempt == "marker" and g.preempted_at is None and t >= max(s.workers_at)
                and self.files.stop.exists()):
            g.preempted_at = t  # every rank read the marker at its first step
        if g.preempted_at is not None and t >= g.preempted_at + s.save_takes:
            self._commit(g, s.save_step)
            self.files.preempted.write_text(json.dumps({"step": s.save_step, "pid": g.pids[0]}))
            self._group_exit(g, exitcodes.PREEMPTED)
        elif s.exit_at is not None and t >= s.exit_at:
            for rank, when in s.errors:
                path = self.files.error(rank)
                write_error_file(path, rank, _raised(s.raises or ValueError(f"rank {rank} diverged")))
                record = json.loads(path.read_text())  # scripted order, not real time; the group's pid
                path.write_text(json.dumps({**record, "time": when, "pid": g.pids[rank]}))
            self._group_exit(g, s.rc)

    def _commit(self, g: FakeGroup, step: int) -> None:
        if step not in g.committed:
            (self.rig.ckpt_dir / step_dirname(step)).mkdir(exist_ok=True)
            g.committed.add(step)

    def _group_exit(self, g: FakeGroup, rc: int) -> None:
        """The group's workers exit with ``rc``: torchrun logs each failed one and restarts, or exits 0."""
        g.ended_at, g.rc = self.clock.now, rc
        self.tail.extend(g.script.tail)
        if rc == 0:
            self.rc, self.ended_at = 0, self.clock.now
            return
        self.tail.extend(f"[W] failed (exitcode: {rc}) local_rank: {r} (pid: {pid}) of binary: python"
                         for r, pid in enumerate(g.pids))
        self.restart_at = self.clock.now + RESTART_TAKES

    def worker_pids(self) -> frozenset[int]:
        g = self.current if self.rc is None else None
        if g is None:
            return frozenset()
        t = self.clock.now - g.started
        return frozenset(pid for pid, at in zip(g.pids, g.script.workers_at, strict=True) if at <= t)

    def signal_workers(self, sig: int) -> int:
        g = self.current if self.rc is None else None
        if g is None:
            return 0
        g.signals_sent.append((self.clock.now, sig))
        if sig == SIGUSR2:
            for rank in range(NPROC):
                if rank not in g.script.mute:
                    self.files.stacks(rank).write_text(f"stacks of rank {rank}\n")
        elif sig == int(signal.SIGKILL):
            self._group_exit(g, -int(signal.SIGKILL))
        return NPROC

    def signal_new_workers(self, sig: int) -> int:
        """Like the real job: only ranks whose process exists, handles ``sig`` and was not reached yet."""
        self.forward_calls += 1
        g = self.current if self.rc is None else None
        if g is None or g.script.on_preempt == "marker":
            return 0
        t = self.clock.now - g.started
        new = [r for r, at in enumerate(g.script.workers_at) if at <= t and r not in g.stopped_at]
        if not new:
            return 0
        g.signals_sent.append((self.clock.now, sig))
        g.stopped_at.update({r: self.clock.now for r in new})
        if g.script.on_preempt == "save" and len(g.stopped_at) == NPROC and g.preempted_at is None:
            g.preempted_at = t  # every rank's flag is set: they agree at the next step and save
        return len(new)

    def kill_tree(self, *, graceful: float = 0.0) -> None:
        self.kills.append((self.clock.now, graceful))
        if self.rc is None:
            g = self.current
            if g is not None:
                g.ended_at, g.rc = self.clock.now, -int(signal.SIGKILL)
            self.rc, self.ended_at = -int(signal.SIGKILL), self.clock.now

    def tree(self) -> list[int]:
        self.tree_calls += 1
        g = self.current
        if g is not None and g.script.raise_in_tree:
            raise RuntimeError("psutil exploded")
        return [self.pid]

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self.log_path.write_text("".join(f"{ln}\n" for ln in self.tail))


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a worker's uncaught exception has."""
    try:
        raise exc
    except BaseException as e:
        return e


class Rig:
    """A supervisor wired to fakes: scripted worker groups (in order, across torchruns), a fake clock, fixed
    jitter."""

    def __init__(self, tmp_path: Path, *scripts: Script, jitter: Callable[[], float] | None = lambda: 0.5,
                 early_signals: list[str] | None = None, lease_lost: Callable[[], str | None] = lambda: None,
                 **supervisor: Any) -> None:
        self.clock = FakeClock()
        self.scripts = list(scripts)
        self.jobs: list[FakeJob] = []
        self.groups: list[FakeGroup] = []
        self.ckpt_dir = tmp_path / "ckpt"
        self.ckpt_dir.mkdir()
        knobs: dict[str, Any] = dict(warm_start=False, grace_seconds=5.0, hang_timeout_seconds=5.0,
                                     startup_timeout_seconds=10.0, backoff_seconds=1.0, backoff_max_seconds=30.0,
                                     max_restarts=3, max_attempts_without_progress=3)
        cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(self.ckpt_dir)),
                           supervisor=SupervisorConfig(**{**knobs, "log_dir": str(tmp_path / "logs"), **supervisor}))
        spec = LaunchSpec(script="train.py", script_args=["--lr", "1"], nproc=NPROC, torchrun_args=[],
                          run_id="run", config=cfg)
        extra = {} if jitter is None else {"jitter": jitter}
        self.sup = Supervisor(spec, echo=False, early_signals=early_signals, start_job=self.start_job,
                              clock=self.clock, lease_lost=lease_lost, **extra)

    def start_job(self, cmd: list[str], env: dict[str, str], log_path: Path, *,
                  echo: Callable[[str], str] | None, warm: object = None) -> FakeJob:
        assert cmd[-2:] == ["--lr", "1"] and cmd[-3].endswith(".py")
        assert cmd[cmd.index("--max-restarts") + 1] == str(TORCHRUN_RESTARTS)  # torchrun restarts its groups
        job = FakeJob(self, env, log_path)
        self.jobs.append(job)
        if job.groups[0].script.signal_on_start:
            self.sup.notify(job.groups[0].script.signal_on_start)
        return job

    def run(self) -> int:
        return self.sup.run()

    def gaps(self) -> list[float]:
        """Fake seconds between each worker group's end and the next one's start (torchrun's restart, or the
        supervisor's backoff and a new torchrun)."""
        out = []
        for a, b in zip(self.groups, self.groups[1:], strict=False):
            assert a.ended_at is not None, "a later group started while an earlier one still ran"
            out.append(b.started - a.ended_at)
        return out


def states(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().removeprefix("supervisor state: ") for r in caplog.records
            if r.getMessage().startswith("supervisor state: ")]


@pytest.fixture(autouse=True)
def _no_real_time_or_signals(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, Any]]:
    """Fail on any real sleep; record (instead of installing) the supervisor's signal handlers."""
    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"real time.sleep({seconds}) called: the supervisor must sleep on its clock")

    handlers: dict[int, Any] = {}
    real_signal = signal.signal
    ours = {int(getattr(signal, n)) for n in ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "SIGQUIT")}

    def fake_signal(signum: int, handler: Any) -> Any:
        if int(signum) not in ours:
            return real_signal(signum, handler)  # e.g. pytest-timeout's SIGALRM
        handlers[int(signum)] = handler
        return signal.SIG_DFL

    monkeypatch.setattr(time, "sleep", no_sleep)
    monkeypatch.setattr(signal, "signal", fake_signal)
    yield handlers


@pytest.fixture(autouse=True)
def _debug_states(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ftrain.launch")


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
    assert sup.signals == ["SIGUSR1"]


def test_an_exception_in_the_loop_still_tears_the_job_down(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Script(exit_at=None, raise_in_tree=True))
    with pytest.raises(RuntimeError, match="psutil exploded"):
        rig.run()
    [job] = rig.jobs
    assert job.kills == [(0.0, 2.0)]  # the finally's graceful teardown, at the first check
