"""The worker's preemption flag also follows the supervisor's stop marker (``stop.json``), cheaply.

A stop that arrives before a worker exists (torchrun still spawning it) reaches it only through the
marker; these pin when the flag reads it (throttled, and on entering the step phase) and that nothing is
read outside ``ftrain launch``. Time is faked by replacing the module's ``time``; every Liveness is
closed (it installs signal handlers, an excepthook, faulthandler and a watcher thread).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftrain import envvars
from ftrain.attempt import RESTORING, SAVING, STEPPING, AttemptFiles, StopRecord, worker_pid
from ftrain.session import liveness as liveness_mod
from ftrain.session.liveness import STOP_CHECK_INTERVAL, Liveness


class FakeTime:
    """Stands in for the liveness module's ``time``: a monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(liveness_mod, "time", types.SimpleNamespace(monotonic=fake.monotonic, time=fake.time))
    return fake


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AttemptFiles:
    f = AttemptFiles(tmp_path / "attempt-000")
    f.create()
    monkeypatch.setenv(envvars.ATTEMPT_DIR, str(f.root))
    return f


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every look for the marker (AttemptFiles.read_stop), whoever makes it."""
    calls: list[int] = []
    real = AttemptFiles.read_stop

    def counting(self: AttemptFiles) -> dict | None:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(AttemptFiles, "read_stop", counting)
    return calls


@pytest.fixture
def live(files: AttemptFiles, clock: FakeTime) -> Iterator[Liveness]:
    lv = Liveness(0, ["SIGUSR1"], 5.0)
    try:
        yield lv
    finally:
        lv.close()


def test_the_marker_sets_the_flag_within_the_throttle(live: Liveness, files: AttemptFiles, clock: FakeTime,
                                                      reads: list[int]) -> None:
    t0 = clock.now
    assert not live.preempt_requested  # the first read looks at once: no marker, no preemption
    assert len(reads) == 1
    for _ in range(1000):  # a step loop reads the flag every step: no look until the interval passed
        assert not live.preempt_requested
    assert len(reads) == 1

    files.write_stop("SIGTERM", 123.0)
    clock.now = t0 + STOP_CHECK_INTERVAL * 0.9
    assert not live.preempt_requested and len(reads) == 1  # still inside the throttle
    clock.now = t0 + STOP_CHECK_INTERVAL
    assert live.preempt_requested and len(reads) == 2
    assert live.preempt_reason == "ftrain launch was stopped by SIGTERM (stop marker)"
    clock.now += 10 * STOP_CHECK_INTERVAL
    assert live.preempt_requested and len(reads) == 2  # once set, never looked for again


def test_no_marker_never_preempts(live: Liveness, clock: FakeTime, reads: list[int]) -> None:
    for _ in range(50):
        assert not live.preempt_requested
        clock.now += STOP_CHECK_INTERVAL
    assert len(reads) == 50 and live.preempt_reason is None


def test_entering_the_step_phase_looks_at_once(live: Liveness, files: AttemptFiles, reads: list[int]) -> None:
    # The end of restore (phase restoring -> step): a stop that came while the worker started counts at
    # its first step, whatever the throttle says.
    assert not live.preempt_requested
    live.beat(RESTORING, 0)
    files.write_stop("SIGUSR1", 1.0)
    assert len(reads) == 1  # other phases do not look
    live.beat(STEPPING, 7)
    assert len(reads) == 2 and live.preempt_reason == "ftrain launch was stopped by SIGUSR1 (stop marker)"
    assert live.preempt_requested


def test_staying_in_the_step_phase_does_not_look(live: Liveness, clock: FakeTime, reads: list[int]) -> None:
    live.beat(STEPPING, 1)
    assert len(reads) == 1
    for step in range(2, 500):
        live.beat(STEPPING, step)
    live.beat(SAVING, 500)
    assert len(reads) == 1
    live.beat(STEPPING, 500)  # back from a save: one look
    assert len(reads) == 2


def test_a_marker_that_cannot_be_parsed_still_stops(live: Liveness, files: AttemptFiles) -> None:
    files.stop.write_text("{not json")
    assert live.preempt_requested
    assert live.preempt_reason == "ftrain launch was stopped by a signal (stop marker)"


def test_without_an_attempt_dir_nothing_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                clock: FakeTime) -> None:
    monkeypatch.delenv(envvars.ATTEMPT_DIR, raising=False)

    def no_read(self: AttemptFiles) -> None:
        raise AssertionError("looked for a stop marker outside ftrain launch")

    monkeypatch.setattr(AttemptFiles, "read_stop", no_read)
    lv = Liveness(0, ["SIGUSR1"], 5.0)
    try:
        assert lv.attempt is None
        for _ in range(20):
            assert not lv.preempt_requested
            clock.now += STOP_CHECK_INTERVAL
        lv.beat(STEPPING, 1)
        assert not lv.check_stop_marker() and not lv.preempt_requested
    finally:
        lv.close()


def test_the_marker_round_trips(files: AttemptFiles) -> None:
    assert files.read_stop() is None
    files.write_stop("SIGTERM", 1700000000.5)
    assert files.read_stop() == StopRecord(signal="SIGTERM", time=1700000000.5)
    assert json.loads(files.stop.read_text()) == {"signal": "SIGTERM", "time": 1700000000.5}  # the format
    assert sorted(p.name for p in files.root.iterdir() if p.is_file()) == ["stop.json"]  # no .partial left


@pytest.mark.slow  # starts processes
def test_a_warm_worker_reports_and_watches_through_its_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/FORMAT.md, "Warm starts (zygote)": the entry's pid in the worker's records, only in the worker itself,
    and the parent watch also follows the entry's parent (torchrun)."""
    assert worker_pid() == os.getpid() and liveness_mod._parents() == (os.getppid(), None)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "the entry"
    try:
        monkeypatch.setenv(envvars.ENTRY_PID, str(stand_in.pid))
        monkeypatch.setenv(envvars.FORKED_PID, str(os.getpid() + 1))  # a child of the worker inherits both
        assert worker_pid() == os.getpid() and liveness_mod._parents() == (os.getppid(), None)
        monkeypatch.setenv(envvars.FORKED_PID, str(os.getpid()))
        assert worker_pid() == stand_in.pid
        assert liveness_mod._parents() == (os.getppid(), os.getpid())  # the entry's parent: here, this process
    finally:
        stand_in.kill()
        stand_in.wait()
    assert liveness_mod._parents() == (os.getppid(), -1)  # the entry is gone: a change the watch sees
