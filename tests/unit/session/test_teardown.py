"""The exit hook that keeps gloo's threads from aborting a finished process (ftrain/session/teardown.py)."""
from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

from ftrain.session import teardown


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_idle_needs_the_threads_quiet_for_the_whole_settle_time() -> None:
    clock = FakeClock()
    # Busy for 10 ms, idle for 5 ms, busy again for 10 ms (a GIL waiter woken by our sleep), then idle.
    timeline = [(0.010, True), (0.015, False), (0.025, True)]
    looks: list[float] = []

    def busy() -> bool:
        looks.append(clock.now)
        return next((b for until, b in timeline if clock.now < until), False)

    assert teardown.wait_idle(busy, settle=0.02, limit=1.0, sleep=clock.sleep, clock=clock)
    # Quiet from 25 ms on; done once 20 ms of quiet were seen, not at the first idle look (10 ms).
    assert 0.045 <= clock.now < 0.05, clock.now
    assert looks[0] == 0.0


def test_wait_idle_gives_up_at_the_limit() -> None:
    clock = FakeClock()
    assert not teardown.wait_idle(lambda: True, settle=0.02, limit=0.5, sleep=clock.sleep, clock=clock)
    assert 0.5 <= clock.now < 0.51


def _stat(task: Path, tid: int, comm: str, state: str) -> None:
    (task / str(tid)).mkdir()
    (task / str(tid) / "stat").write_text(f"{tid} ({comm}) {state} 1 1 1 0 -1 4194560 0 0 0\n")


def test_busy_means_a_collective_thread_runnable_or_in_uninterruptible_sleep(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    _stat(task, 10, "python", "R")  # the main thread running: not a collective thread
    _stat(task, 11, "pt_gloo_runloop", "S")
    _stat(task, 12, "gloo (x) ) R", "R")  # a name with spaces and parentheses parses
    assert not teardown.collective_threads_busy(str(task))
    _stat(task, 13, "pt_gloo_runloop", "R")
    assert teardown.collective_threads_busy(str(task))
    (task / "13" / "stat").write_text("13 (pt_gloo_runloop) D 1 1\n")
    assert teardown.collective_threads_busy(str(task))
    assert not teardown.collective_threads_busy(str(tmp_path / "missing"))


def test_a_real_spinning_thread_of_that_name_is_seen_until_it_stops() -> None:
    stop = threading.Event()
    named = threading.Event()

    def spin() -> None:
        libc = ctypes.CDLL(None)
        libc.prctl(15, b"pt_gloo_runloop", 0, 0, 0)  # PR_SET_NAME: what /proc/self/task/<tid>/comm shows
        named.set()
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    assert named.wait(5)
    seen = any(teardown.collective_threads_busy() for _ in range(200) if not time.sleep(0.001))
    stop.set()
    t.join(5)
    assert seen
    assert teardown.wait_idle(teardown.collective_threads_busy, limit=2.0)
