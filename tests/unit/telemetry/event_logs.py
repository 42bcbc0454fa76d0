"""Synthetic event logs for the goodput and status tests (test_timeline.py, test_job_timeline.py, test_live.py):
event builders, a crash-then-success run, and a hypothesis strategy for arbitrary (hostile) events."""
from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

A = "hostA/100"


def sup(t: float, ev: str, node: str = A, **f: Any) -> dict[str, Any]:
    return {"t": t, "ev": ev, "run": "r", "src": "supervisor", "node": node, "host": node.split("/")[0], **f}


def work(t: float, ev: str, pid: int, node: str = A, rank: int = 0, **f: Any) -> dict[str, Any]:
    return {"t": t, "ev": ev, "run": "r", "src": "worker", "node": node, "rank": rank, "pid": pid, **f}


def crash_then_success() -> list[dict[str, Any]]:
    """Launcher up at 2 s; attempt 0 crashes at 25 after checkpoints 10 and 20; attempt 1 resumes 20, ends 45."""
    return [
        sup(2, "launch", proc_start=0.0, max_restarts=3),
        sup(2, "attempt_start", attempt=0, number=0, dir="/x/attempt-000"),
        work(6, "session_start", 11, proc_start=4.0, local_rank=0, world=2, attempt=0, total_steps=40),
        work(6.5, "restore", 11, step=0, start=6.0, seconds=0.5, found=False),
        work(7, "first_step", 11, step=1),
        work(10.2, "save", 11, step=10, start=10.0, blocking=0.2),
        work(10.5, "committed", 11, step=10, seconds=0.5),
        work(15, "progress", 11, step=15),
        work(20.2, "save", 11, step=20, start=20.0, blocking=0.2),
        work(20.5, "committed", 11, step=20, seconds=0.5),
        work(23, "progress", 11, step=23),
        sup(25, "failure", attempt=0, rank=1, exit_code=-9, detail="rank 1 exited with signal SIGKILL"),
        sup(25, "attempt_end", attempt=0, outcome="failed", exit_code=1, detail="rank 1 exited with signal SIGKILL"),
        sup(25, "backoff", attempt=0, delay=1.0),
        sup(26, "attempt_start", attempt=1, number=1, dir="/x/attempt-001"),
        work(30, "session_start", 22, proc_start=28.0, local_rank=0, world=2, attempt=1),
        work(31, "restore", 22, step=20, start=30.0, seconds=1.0, found=True),
        work(32, "first_step", 22, step=21),
        work(41.2, "save", 22, step=30, start=41.0, blocking=0.2),
        work(41.5, "committed", 22, step=30, seconds=0.5),
        work(44.6, "save", 22, step=40, start=44.5, blocking=0.1),  # the last step's save, waited for by close()
        work(44.9, "committed", 22, step=40, seconds=0.4),
        work(45, "finished", 22, step=40),
        sup(46, "attempt_end", attempt=1, outcome="succeeded", exit_code=0, detail="all ranks finished"),
        sup(46.2, "launch_end", exit_code=0, reason="attempt 1 succeeded"),
    ]


_EVENT = st.fixed_dictionaries(
    {"t": st.floats(0, 1000), "ev": st.sampled_from(["launch", "attempt_start", "attempt_end", "backoff", "hang",
                                                       "group_end", "launch_end", "session_start", "restore",
                                                       "first_step", "progress", "save", "committed", "preempted",
                                                       "finished", "signal", "junk"]),
     "src": st.sampled_from(["supervisor", "worker", 7, None]), "node": st.sampled_from([A, "b/1", 3]),
     "rank": st.sampled_from([0, 1, "0", None]), "pid": st.sampled_from([1, 2, None]),
     "local_rank": st.sampled_from([0, 1]),
     "step": st.one_of(st.none(), st.integers(-5, 50), st.text(max_size=3)),
     "start": st.one_of(st.none(), st.floats(-1e13, 1e13), st.just(float("nan")), st.booleans()),
     "seconds": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
     "blocking": st.one_of(st.none(), st.floats(-5, 50)), "delay": st.one_of(st.none(), st.floats(-5, 50)),
     "since": st.one_of(st.none(), st.floats(0, 1000)), "proc_start": st.one_of(st.none(), st.floats(0, 1000)),
     "found": st.booleans(), "outcome": st.sampled_from(["failed", "succeeded", 1])})
