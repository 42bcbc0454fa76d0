"""Fakes for the supervisor's single-node loop tests (test_loop.py, test_notices_loop.py): a scripted torchrun
(:class:`FakeJob`, whose worker groups replay :class:`Script` s), fake time (:class:`FakeClock`) and a supervisor
wired to them (:class:`Rig`); and the fixtures those tests use (import them by name into the test module).
"""
from __future__ import annotations

import json
import logging
import math
import signal
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
from ftrain.supervisor.command import TORCHRUN_RESTARTS
from ftrain.supervisor.stop import StopRequest
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
            if self.rc is None and self.restart_at is not None and self.clock.now >= self.restart_at:
                self._start_group()  # restart_takes 0: within the poll that saw the group end
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
        self.restart_at = self.clock.now + self.rig.restart_takes

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
        #: Seconds torchrun takes to restart a failed group (:data:`RESTART_TAKES`; less to race the supervisor).
        self.restart_takes = RESTART_TAKES
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
        early = [StopRequest.signal(name) for name in early_signals] if early_signals is not None else None
        self.sup = Supervisor(spec, echo=False, early_stops=early, start_job=self.start_job,
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


