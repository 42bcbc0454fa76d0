"""Goodput arithmetic on synthetic event logs: every second lands in exactly one bucket, with known answers."""
from __future__ import annotations

import math
from typing import Any

import pytest
from event_logs import _EVENT, A, crash_then_success, sup, work  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.telemetry import advisor
from ftrain.telemetry.timeline import BUCKETS, build, paint


def test_buckets_of_a_crash_and_a_resume() -> None:
    tl = build(crash_then_success())
    assert tl is not None
    b = tl.buckets
    assert tl.wall == pytest.approx(46.2)
    assert b["startup"] == pytest.approx(2 + 2 + 2)  # launcher 0-2, workers 4-6 and 28-30
    assert b["rendezvous"] == pytest.approx(2 + 2)  # torchrun 2-4 and 26-28
    assert b["restore"] == pytest.approx(1.5)
    assert b["save"] == pytest.approx(0.7)
    assert b["productive"] == pytest.approx((20 - 6.5 - 0.2) + (45 - 31 - 0.3))  # up to step 20, and all of #1
    assert b["lost"] == pytest.approx(25 - 20 - 0.2)  # steps 21-23+ of attempt 0 were done again
    assert b["backoff"] == pytest.approx(1.0)
    assert b["other"] == pytest.approx(46.2 - 45)  # teardown after the last step
    assert b["down"] == b["hang"] == 0
    assert sum(b.values()) == pytest.approx(tl.wall)
    assert tl.goodput == pytest.approx(b["productive"] / 46.2)
    assert tl.counts == {"attempts": 2, "unplanned": 1, "preemptions": 0, "membership": 0, "saves": 4, "commits": 4,
                         "restores": 1}
    assert tl.recoveries == [pytest.approx(25 - 25 + 1 + 2 + 2 + 1)]  # backoff, rendezvous, startup, restore
    assert [lane.label for lane in tl.lanes] == ["hostA attempt 0", "hostA attempt 1"]
    first = tl.lanes[0]
    assert (first.start, first.end) == (0.0, 26)
    kinds = [m.kind for m in first.marks]
    assert kinds.count("commit") == 2 and "failure" in kinds
    assert any(m.kind == "restore" and m.text == "restored step 20" for m in tl.lanes[1].marks)


def test_a_hang_is_its_own_bucket_from_the_last_heartbeat() -> None:
    ev = crash_then_success()
    i = next(k for k, e in enumerate(ev) if e["ev"] == "failure")
    ev[i:i + 2] = [sup(25, "hang", attempt=0, verdict="rank 1 made no progress for 4s", since=21.0),
                   sup(25, "attempt_end", attempt=0, outcome="hung", exit_code=None, detail="hang")]
    tl = build(ev)
    assert tl is not None
    assert tl.buckets["hang"] == pytest.approx(25 - 21)
    assert tl.buckets["lost"] == pytest.approx(21 - 20 - 0.2)
    assert sum(tl.buckets.values()) == pytest.approx(tl.wall)


def test_a_preemption_loses_nothing_and_the_gap_between_launches_is_down() -> None:
    first = [
        sup(2, "launch", node="h/1", proc_start=0.0),
        sup(2, "attempt_start", node="h/1", attempt=0, number=0),
        work(5, "session_start", 11, node="h/1", proc_start=3.0, local_rank=0),
        work(5, "restore", 11, node="h/1", step=0, start=5.0, seconds=0.0, found=False),
        work(10.0, "save", 11, node="h/1", step=10, start=9.0, blocking=1.0),
        sup(9.5, "signal", node="h/1", name="SIGTERM"),
        work(10.1, "committed", 11, node="h/1", step=10),
        work(10.2, "preempted", 11, node="h/1", step=10, reason="received SIGTERM"),
        sup(11, "launch_end", node="h/1", exit_code=75, reason="stopped by SIGTERM"),
    ]
    second = [
        sup(22, "launch", node="h/2", proc_start=20.0),
        sup(22, "attempt_start", node="h/2", attempt=0, number=1),
        work(25, "session_start", 33, node="h/2", proc_start=23.0, local_rank=0),
        work(26, "restore", 33, node="h/2", step=10, start=25.0, seconds=1.0, found=True),
        work(30, "finished", 33, node="h/2", step=14),
        sup(31, "launch_end", node="h/2", exit_code=0),
    ]
    tl = build(first + second)
    assert tl is not None
    b = tl.buckets
    assert b["down"] == pytest.approx(20 - 11)
    assert b["lost"] == 0
    assert b["save"] == pytest.approx(1.2)  # the final save until its marker: its commit included
    assert b["productive"] == pytest.approx((9 - 5) + (30 - 26))
    assert tl.counts["preemptions"] == 1 and tl.counts["unplanned"] == 0
    assert tl.running_goodput == pytest.approx(b["productive"] / (31 - 9))
    assert sum(b.values()) == pytest.approx(31)
    assert any(m.kind == "preemption" and m.text == "SIGTERM" for m in tl.lanes[0].marks)


def test_multi_node_lanes_per_node_with_a_failed_group() -> None:
    """Two nodes; B's rank 2 fails at 10 (counted on B), A's group ends as a membership change; both restart.
    More (a lost node, a scale-up, several directories): test_job_timeline.py."""
    b_node = "hostB/200"
    ev = [
        # (nnodes says multi-node: a single-node launch has worker groups too, one lane per attempt)
        sup(1, "launch", proc_start=0.0, nnodes=[1, 2]), sup(1, "launch", node=b_node, proc_start=0.0, nnodes=[1, 2]),
        sup(1, "attempt_start", attempt=0, number=0), sup(1, "attempt_start", node=b_node, attempt=0, number=0),
        work(4, "session_start", 11, proc_start=3.0, local_rank=0),
        work(4, "session_start", 12, node=b_node, rank=2, proc_start=3.0, local_rank=0),
        work(4, "restore", 11, step=0, start=4.0, seconds=0.0, found=False),
        work(8.1, "save", 11, step=8, start=8.0, blocking=0.1),
        sup(10, "group_end", node=b_node, group=0, ending="failed", detail="rank 2 died", counted=True),
        sup(10, "group_end", group=0, ending="membership change", detail="a node left", counted=False),
        work(13, "session_start", 21, proc_start=12.0, local_rank=0),
        work(13, "session_start", 22, node=b_node, rank=2, proc_start=12.0, local_rank=0),
        work(13.5, "restore", 21, step=8, start=13.0, seconds=0.5, found=True),
        work(20, "finished", 21, step=15),
        sup(21, "launch_end", exit_code=0), sup(21, "launch_end", node=b_node, exit_code=0),
    ]
    tl = build(ev)
    assert tl is not None
    assert [lane.label for lane in tl.lanes] == ["hostA launch 1", "hostB launch 1"]
    assert tl.buckets["rendezvous"] == pytest.approx((3 - 1) + (12 - 10))
    assert tl.buckets["lost"] == pytest.approx(10 - 8 - 0.1)
    assert sum(tl.buckets.values()) == pytest.approx(tl.wall)
    for lane in tl.lanes:  # both nodes took part in all of it: the same timeline
        assert [(s.start, s.end, s.bucket) for s in lane.segments] == [
            (0, 1, "startup"), (1, 3, "rendezvous"), (3, 4, "startup"), (4, 8, "productive"), (8, 8.1, "save"),
            (8.1, 10, "lost"), (10, 12, "rendezvous"), (12, 13, "startup"), (13, 13.5, "restore"),
            (13.5, 20, "productive"), (20, 21, "other")]
    assert any(m.kind == "resize" for m in tl.lanes[0].marks)
    assert tl.counts["unplanned"] == 1 and tl.counts["membership"] == 1 and tl.counts["preemptions"] == 0


def test_paint_resolves_overlaps_by_priority_and_fills_gaps() -> None:
    segs = paint([(0, 10, "other"), (2, 4, "productive"), (3, 5, "save"), (8, 12, "lost")], 0, 11, fill="down")
    assert [(s.start, s.end, s.bucket) for s in segs] == [
        (0, 2, "other"), (2, 3, "productive"), (3, 5, "save"), (5, 8, "other"), (8, 11, "lost")]


@settings(max_examples=500, deadline=None)
@given(st.lists(_EVENT, max_size=40))
def test_any_event_soup_gives_buckets_that_sum_to_the_wall_time(events: list[dict[str, Any]]) -> None:
    tl = build(events)
    if tl is None:
        return
    assert all(v >= 0 for v in tl.buckets.values())
    assert set(tl.buckets) == set(BUCKETS)
    assert math.isclose(sum(tl.buckets.values()), tl.wall, rel_tol=1e-9, abs_tol=1e-6)
    for lane in tl.lanes:
        assert all(lane.start <= s.start <= s.end <= lane.end for s in lane.segments)
    advisor.advise(tl, 100.0)  # and the advisor takes whatever came out


def test_advisor_closed_forms_and_model() -> None:
    assert advisor.young(3600, 2.0) == pytest.approx(math.sqrt(2 * 3600 * 2))
    assert advisor.daly(3600, 2.0, 60) == pytest.approx(math.sqrt(2 * 3660 * 2 + 4))
    kw = {"productive": 3000.0, "fixed": 20.0, "save_cost": 0.5, "recovery": 8.0, "mtbf": 60.0}
    best = max((advisor.model_goodput(x / 10, **kw), x / 10) for x in range(1, 600))
    d = advisor.daly(60.0, 0.5, 8.0)
    # Daly's closed form lands near the model's own optimum, where the curve is flat.
    assert advisor.model_goodput(d, **kw) == pytest.approx(best[0], rel=0.01)
    assert advisor.model_goodput(2 * 60 / 0.5, **kw) == 0.0  # longer than a failure apart: never finishes


def test_advisor_on_a_measured_run() -> None:
    tl = build(crash_then_success())
    assert tl is not None
    a = advisor.advise(tl)
    assert isinstance(a, advisor.Advice)
    assert a.save_cost == pytest.approx((3 * 0.2 + 0.1) / 4)
    assert a.mtbf == pytest.approx(46.2)  # one failure that lost work in 46.2 s of running
    assert a.recovery == pytest.approx(6.0)
    # Seconds between one save's end and the next one's start, over both attempts' pairs.
    assert a.used == pytest.approx(((20 - 10.2) + (44.5 - 41.2)) / 2)
    assert a.daly == pytest.approx(advisor.daly(46.2, a.save_cost, 6.0))
    assert a.model_used is not None and 0 < a.model_used < 1
    text = advisor.describe(a)
    assert "recommended checkpoint.every_seconds" in text[1]
    quiet = [e for e in crash_then_success() if e["ev"] not in ("failure",)]
    for e in quiet:
        if e["ev"] == "attempt_end":
            e["outcome"] = "succeeded"
    assert isinstance(advisor.advise(build(quiet[:13] + quiet[-3:])), (advisor.Advice, str))
    no_saves = [e for e in crash_then_success() if e["ev"] != "save"]
    assert "no save was measured" in advisor.advise(build(no_saves))  # type: ignore[operator]
