"""Fakes for the supervisor's multi-node loop tests (test_nodes_loop.py, test_notices_loop.py): one torchrun for the
whole launch (:class:`NodeJob`) replaying worker groups (:class:`G`) on fake time, and a supervisor wired to it
(:class:`Rig`).
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

from ftrain import envvars
from ftrain.attempt import STEPPING, AttemptFiles
from ftrain.checkpoint.format import step_dirname
from ftrain.config import CheckpointConfig, FtrainConfig, SupervisorConfig
from ftrain.supervisor.command import LaunchSpec
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


