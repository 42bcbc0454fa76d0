"""A multi-node job's timeline and status, on synthetic logs with hand-computed answers (issue 22): one lane per
node (host plus launch) painted with that node's own timeline, torchrun's stop at a scale-up counted as a
membership change and not as a preemption, a stalled save painted as save, and one job-wide view over several
node-local directories. Real 2-node runs: tests/integration/test_elastic_chaos.py (one shared directory) and
test_nodelocal.py (a directory per node)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from event_logs import _EVENT
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.attempt import Heartbeat
from ftrain.cli import main
from ftrain.events import read_events
from ftrain.telemetry.live import read_status, status_of
from ftrain.telemetry.timeline import Timeline, build

A, B, C = "hostA/100", "hostB/200", "hostA/300"  # C: node A back after it was lost (same host, a new launch)


def sup(t: float, ev: str, node: str, **f: Any) -> dict[str, Any]:
    return {"t": t, "ev": ev, "run": "r", "src": "supervisor", "node": node, "host": node.split("/")[0], **f}


def work(t: float, ev: str, node: str, pid: int, rank: int = 0, **f: Any) -> dict[str, Any]:
    return {"t": t, "ev": ev, "run": "r", "src": "worker", "node": node, "rank": rank, "pid": pid, **f}


def lost_and_rejoined() -> list[dict[str, Any]]:
    """Two nodes (--nnodes 1:2); A (rank 0) trains to step 14 and is killed whole at ~14.5 without a trace; B goes
    on alone from step 10; A comes back as C at 19; torchrun stops B's workers at 25 to admit it (they save step
    16: ``preempted``, no signal anywhere); B and C train to the end together."""
    return [
        sup(1, "launch", A, proc_start=0.0, nnodes=[1, 2], ckpt_dir="/ck"),
        sup(1, "launch", B, proc_start=0.0, nnodes=[1, 2], ckpt_dir="/ck"),
        sup(1, "attempt_start", A, attempt=0, number=0, dir="/ck/logs/r/hostA/attempt-000"),
        sup(1, "attempt_start", B, attempt=0, number=0, dir="/ck/logs/r/hostB/attempt-000"),
        sup(2, "group_start", A, group=0, workers=2), sup(2, "group_start", B, group=0, workers=2),
        work(5, "session_start", A, 11, proc_start=3.0, local_rank=0, world=4, total_steps=30),
        work(5, "session_start", B, 21, rank=2, proc_start=3.0, local_rank=0, world=4, total_steps=30),
        work(5, "restore", A, 11, step=0, start=5.0, seconds=0.0, found=False),
        work(6, "first_step", A, 11, step=1),
        work(10.5, "save", A, 11, step=10, start=10.0, blocking=0.5),
        work(10.6, "committed", A, 11, step=10, seconds=0.6),
        work(14, "progress", A, 11, step=14),
        sup(15, "group_end", B, group=0, ending="membership change", detail="a peer was lost", counted=False),
        sup(16, "group_start", B, group=1, workers=2),
        work(18, "session_start", B, 22, proc_start=17.0, local_rank=0, world=2, total_steps=30),
        work(18.5, "restore", B, 22, step=10, start=18.0, seconds=0.5, found=True),
        work(19, "first_step", B, 22, step=11),
        sup(20, "launch", C, proc_start=19.0, nnodes=[1, 2], ckpt_dir="/ck"),
        sup(20, "attempt_start", C, attempt=0, number=1, dir="/ck/logs/r/hostA/attempt-001"),
        work(24.2, "save", B, 22, step=16, start=24.0, blocking=0.2),
        work(24.5, "committed", B, 22, step=16, seconds=0.5),
        work(25, "preempted", B, 22, step=16, reason="received SIGTERM"),
        sup(26, "group_end", B, group=1, ending="membership change", detail="torchrun stopped the workers",
            counted=False),
        sup(26.5, "group_start", B, group=2, workers=2), sup(26.5, "group_start", C, group=0, workers=2),
        work(29, "session_start", B, 23, proc_start=27.0, local_rank=0, world=4, total_steps=30),
        work(29, "session_start", C, 31, rank=2, proc_start=27.0, local_rank=0, world=4, total_steps=30),
        work(29.5, "restore", B, 23, step=16, start=29.0, seconds=0.5, found=True),
        work(30, "first_step", B, 23, step=17),
        work(40, "finished", B, 23, step=30),
        sup(41, "group_end", B, group=2, ending="finished", detail="", counted=False),
        sup(41, "group_end", C, group=0, ending="finished", detail="", counted=False),
        sup(41.5, "launch_end", B, exit_code=0), sup(41.5, "launch_end", C, exit_code=0),
    ]


def timeline(events: list[dict[str, Any]]) -> Timeline:
    tl = build(events)
    assert tl is not None
    return tl


def spans(tl: Timeline, label: str) -> list[tuple[float, float, str]]:
    (lane,) = [lane for lane in tl.lanes if lane.label == label]
    return [(s.start, s.end, s.bucket) for s in lane.segments]


def test_each_node_has_a_lane_with_its_own_timeline() -> None:
    tl = timeline(lost_and_rejoined())
    assert [lane.label for lane in tl.lanes] == ["hostA launch 1", "hostB launch 1", "hostA launch 2"]
    # The killed node trained: its lane runs until the group it was in ended (B saw the loss at 15), and its
    # work after the checkpoint the job resumed from (10) was lost.
    assert spans(tl, "hostA launch 1") == [(0, 1, "startup"), (1, 3, "rendezvous"), (3, 5, "startup"),
                                           (5, 10, "productive"), (10, 10.5, "save"), (10.5, 15, "lost")]
    assert spans(tl, "hostB launch 1") == [
        (0, 1, "startup"), (1, 3, "rendezvous"), (3, 5, "startup"), (5, 10, "productive"), (10, 10.5, "save"),
        (10.5, 15, "lost"), (15, 17, "rendezvous"), (17, 18, "startup"), (18, 18.5, "restore"),
        (18.5, 24, "productive"), (24, 25, "save"),  # the save for the scale-up, its commit included
        (25, 27, "rendezvous"),  # from torchrun's stop, not from when the supervisor saw the workers gone
        (27, 29, "startup"), (29, 29.5, "restore"), (29.5, 40, "productive"), (40, 41.5, "other")]
    # The node that came back is not productive before its own workers started, while B trained alone.
    assert spans(tl, "hostA launch 2") == [(19, 20, "startup"), (20, 27, "rendezvous"), (27, 29, "startup"),
                                           (29, 29.5, "restore"), (29.5, 40, "productive"), (40, 41.5, "other")]
    for lane in tl.lanes:
        assert sum(lane.buckets.values()) == pytest.approx(lane.end - lane.start)
    lost_mark = [m for m in tl.lanes[0].marks if m.kind == "failure"]
    assert [(m.t, m.text) for m in lost_mark] == [(15, "node lost")]
    assert not any(m.text == "node lost" for lane in tl.lanes[1:] for m in lane.marks)


def test_the_job_adds_up_and_a_scale_up_stop_is_a_membership_change() -> None:
    tl = timeline(lost_and_rejoined())
    b = tl.buckets
    assert tl.wall == 41.5
    assert b["productive"] == pytest.approx(5 + 5.5 + 10.5)
    assert b["startup"] == pytest.approx(1 + 2 + 1 + 2)
    assert b["rendezvous"] == pytest.approx(2 + 2 + 2)
    assert (b["save"], b["lost"], b["restore"], b["other"]) == pytest.approx((1.5, 4.5, 1.0, 1.5))
    assert b["down"] == b["hang"] == 0
    assert tl.counts == {"attempts": 3, "unplanned": 1, "preemptions": 0, "membership": 2, "saves": 2,
                         "commits": 2, "restores": 2}
    # The same stop after a preemption signal to any node's supervisor is a preemption.
    signalled = [*lost_and_rejoined(), sup(24.8, "signal", C, name="SIGTERM")]
    counts = timeline(signalled).counts
    assert (counts["preemptions"], counts["membership"]) == (1, 1)


def stalled(ending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One node; the save of step 20 starts at 20 and never returns: ``ending`` ends the attempt at 30."""
    return [
        sup(1, "launch", A, proc_start=0.0, nnodes=[1, 1]),
        sup(1, "attempt_start", A, attempt=0, number=0, dir="/ck/a0"),
        work(3, "session_start", A, 11, proc_start=2.0, local_rank=0),
        work(3, "restore", A, 11, step=0, start=3.0, seconds=0.0, found=False),
        work(4, "first_step", A, 11, step=1),
        work(10.5, "save", A, 11, step=10, start=10.0, blocking=0.5),
        work(10.6, "committed", A, 11, step=10),
        work(19, "progress", A, 11, step=19),
        *ending,
        sup(31, "launch_end", A, exit_code=1),
    ]


@pytest.mark.parametrize("ending", [
    [sup(29, "hang", A, attempt=0, verdict="rank 1 made no progress", since=20.0, phase="saving", step=19),
     sup(30, "attempt_end", A, attempt=0, outcome="hung", exit_code=1)],  # (the hang alone says it: no saving)
    [sup(30, "attempt_end", A, attempt=0, outcome="failed", exit_code=1, saving=20.0)],  # killed from outside
], ids=["hang detected in the save", "no hang detected"])
def test_a_stalled_save_is_save_time(ending: list[dict[str, Any]]) -> None:
    b = timeline(stalled(ending)).buckets
    assert b["save"] == pytest.approx(0.5 + 10)  # step 10's save, and the stalled one from 20 to the end at 30
    assert b["lost"] == pytest.approx(20 - 10.5)  # steps 11-19: after the checkpoint a restart resumes from
    assert b["hang"] == 0 and b["other"] == pytest.approx(1)  # the launcher's exit, 30-31


def test_a_hang_outside_a_save_is_hang_time() -> None:
    b = timeline(stalled([sup(29, "hang", A, attempt=0, verdict="rank 1 silent", since=21.0, phase="step"),
                          sup(30, "attempt_end", A, attempt=0, outcome="hung", exit_code=1)])).buckets
    assert (b["hang"], b["save"], b["lost"]) == pytest.approx((30 - 21, 0.5, 21 - 10.5))


def test_a_group_that_ended_inside_a_save_paints_save_on_its_node() -> None:
    events = lost_and_rejoined()
    i = next(k for k, e in enumerate(events) if e["ev"] == "group_end")
    events[i]["saving"] = 13.0  # B's ranks were in a save (step 13) when the peer vanished
    tl = timeline(events)
    assert (13, 15, "save") in spans(tl, "hostB launch 1")
    assert tl.buckets["save"] == pytest.approx(1.5 + 2) and tl.buckets["lost"] == pytest.approx(4.5 - 2)


def beats(rank: int, phase: str, step: int, at: float, pid: int = 1) -> Heartbeat:
    return Heartbeat(phase, step, at, 0, pid)


def test_status_is_one_job_over_every_node() -> None:
    events = [e for e in lost_and_rejoined() if e["t"] <= 35]
    seen: dict[str, tuple[str, str]] = {}

    def reader(dirs: dict[str, tuple[str, str]]) -> dict[str, dict[int, Heartbeat]]:
        seen.update(dirs)
        return {B: {0: beats(0, "step", 33, 34.0), 1: beats(1, "step", 33, 34.5),
                    3: beats(3, "step", 12, 14.0)},  # a rank of an earlier, larger group: its file stays behind
                C: {2: beats(2, "step", 33, 34.2), 3: beats(3, "saving", 32, 33.0)}}

    st = status_of(events, reader, 35.0)
    assert seen == {B: ("/ck/logs/r/hostB/attempt-000", "/ck"), C: ("/ck/logs/r/hostA/attempt-001", "/ck")}
    assert [(n.label, n.state, n.group) for n in st.nodes] == [
        ("hostA launch 1", "lost", 0), ("hostB launch 1", "running", 2), ("hostA launch 2", "running", 0)]
    assert [(r.rank, r.node) for r in st.ranks] == [(2, "hostA launch 2"), (3, "hostA launch 2"),
                                                    (0, "hostB launch 1"), (1, "hostB launch 1")]
    assert (st.state, st.saving_for) == ("saving", 2.0)
    assert st.restarts == 0 and st.world == 4 and st.newest_step == 16
    assert any("hostA launch 1 lost" in line for line in st.recent)
    end = status_of(lost_and_rejoined(), {}, 50.0)
    assert end.state == "finished"
    assert [n.state for n in end.nodes] == ["lost", "exited 0", "exited 0"]


def write_log(root: Path, events: list[dict[str, Any]]) -> None:
    (root / "events").mkdir(parents=True)
    (root / "events" / "r.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_node_local_directories_make_one_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each node wrote its own log on its own disk (rank 0's events where rank 0 ran): given every node's
    directory, goodput and status are the job's, as from one shared log."""
    events = lost_and_rejoined()
    disk_a, disk_b = tmp_path / "disk-a", tmp_path / "disk-b"
    write_log(disk_a, [e for e in events if e["node"] in (A, C)])
    write_log(disk_b, [e for e in events if e["node"] == B])
    merged = read_events(disk_a, disk_b)
    assert sorted(map(json.dumps, merged)) == sorted(map(json.dumps, events))
    assert [e["t"] for e in merged] == sorted(e["t"] for e in events)
    assert read_events(disk_b, disk_b) == read_events(disk_b)  # one directory given twice: read once
    # A copy of a node's log beside the original (or a node's disk mounted twice) counts once.
    write_log(tmp_path / "copy", [e for e in events if e["node"] == B])
    assert read_events(disk_a, disk_b, tmp_path / "copy") == merged
    assert main(["goodput", str(disk_a), str(disk_b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["buckets"] == pytest.approx(timeline(events).buckets)
    assert [(lane["label"], lane["node"]) for lane in report["lanes"]] == [
        ("hostA launch 1", A), ("hostB launch 1", B), ("hostA launch 2", C)]
    assert report["counts"]["preemptions"] == 0 and report["counts"]["membership"] == 2
    assert main(["goodput", str(disk_a), str(disk_b)]) == 0
    assert "0 preemption(s), 2 membership change(s)" in capsys.readouterr().out
    # The heartbeats of each node, in its attempt directory on its own disk, recorded under /ck (the path every
    # node mounts its disk at).
    for disk, sub, rank in ((disk_b, "hostB/attempt-000", 0), (disk_a, "hostA/attempt-001", 2)):
        hb = disk / "logs" / "r" / sub / "heartbeats"
        hb.mkdir(parents=True)
        (hb / f"rank-{rank:05d}").write_text(f"step 33 34.000 0 {rank + 7}\n")
    st = read_status(disk_a, disk_b, now=35.0)
    assert st.state == "finished"  # the whole log: both nodes exited
    assert main(["status", str(disk_a), str(disk_b)]) == 0
    screen = capsys.readouterr().out
    assert "hostA launch 1: lost" in screen and "hostB launch 1: exited 0" in screen
    for disk in (disk_a, disk_b):  # the job as it was at 35 s: both nodes running
        log = disk / "events" / "r.jsonl"
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["t"] <= 35]
        log.write_text("".join(line + "\n" for line in kept))
    st = read_status(disk_a, disk_b, now=35.0)
    assert sorted((r.rank, r.node) for r in st.ranks) == [(0, "hostB launch 1"), (2, "hostA launch 2")]


DATA = Path(__file__).parent / "data"


def first_start(events: list[dict[str, Any]], node: str) -> float:
    """When the node's workers first started (its local rank 0's process)."""
    return min(e["proc_start"] for e in events if e["ev"] == "session_start" and e["node"] == node)


def check_lanes(tl: Timeline, events: list[dict[str, Any]]) -> None:
    """Every lane adds up, begins with its launcher's startup, and shows no work before its own workers began."""
    for lane in tl.lanes:
        assert sum(lane.buckets.values()) == pytest.approx(lane.end - lane.start)
        assert lane.segments[0].bucket == "startup"
        begun = first_start(events, lane.node)
        assert all(s.start >= begun for s in lane.segments if s.bucket in ("productive", "restore", "save", "lost"))


def test_a_real_shared_directory_run_lost_and_rejoined() -> None:
    """tests/integration/test_elastic_chaos.py's log (an earlier format: no ``saving``, no ``ckpt_dir``): nodes
    4826 and 4828; 4826 (rank 0) killed whole inside the save of step 8; 4828 on alone from step 4; 5059 joins
    (torchrun stops 4828's workers: they save step 10) and is killed whole at step 12; 4828 finishes."""
    events = read_events(DATA / "shared")
    tl = timeline(events)
    check_lanes(tl, events)
    assert [(lane.label, lane.node) for lane in tl.lanes] == [("vm launch 1", "vm/4826"), ("vm launch 2", "vm/4828"),
                                                              ("vm launch 3", "vm/5059")]
    # Before issue 22: 1 preemption (the scale-up's stop), lane 1 all startup, lane 3 productive at its start.
    assert tl.counts == {"attempts": 4, "unplanned": 2, "preemptions": 0, "membership": 3, "saves": 22,
                         "commits": 21, "restores": 3}
    killed, survivor, rejoined = tl.lanes
    regroup = next(e["t"] for e in events if e["ev"] == "group_end")
    assert killed.end == regroup and killed.buckets["productive"] > 2.0 and killed.buckets["lost"] > 2.0
    assert [m.text for m in killed.marks if m.kind == "failure"] == ["node lost"]
    assert [m.text for m in rejoined.marks if m.kind == "failure"] == ["node lost"]
    assert not any(m.kind == "failure" for m in survivor.marks)
    assert sum(tl.buckets.values()) == pytest.approx(tl.wall)
    st = read_status(DATA / "shared", now=tl.end + 60)
    assert st.state == "finished" and [n.state for n in st.nodes] == ["lost", "exited 0", "lost"]


def test_a_real_run_on_node_local_disks_is_one_job() -> None:
    """tests/integration/test_nodelocal.py's two disks after the run (the lost nodes' disks were wiped, their
    logs with them): vm/9598 on disk-b all along, vm/10133 on disk-a since it came back last."""
    disks = [DATA / "nodelocal" / "disk-a", DATA / "nodelocal" / "disk-b"]
    events = read_events(*disks)
    tl = timeline(events)
    check_lanes(tl, events)
    assert [(lane.label, lane.node) for lane in tl.lanes] == [("vm launch 1", "vm/9598"), ("vm launch 2", "vm/10133")]
    assert [len(timeline(read_events(d)).lanes) for d in disks] == [1, 1]
    assert tl.counts["preemptions"] == 0 and tl.counts["commits"] == 5
    assert tl.lanes[1].buckets["productive"] == pytest.approx(tl.lanes[0].buckets["productive"])  # the last group
    st = read_status(*disks, now=tl.end + 60)
    assert st.state == "finished" and [n.state for n in st.nodes] == ["exited 0", "exited 0"]


def test_two_nodes_of_one_host_on_their_own_disks(tmp_path: Path) -> None:
    """Same host, same checkpoint path, each its own disk: both record /ck/logs/r/vm/attempt-000; each node's
    heartbeats are read from the disk that holds its log."""
    for k in (1, 2):
        node = f"vm/{k}"
        write_log(tmp_path / f"disk-{k}", [
            sup(1, "launch", node, proc_start=0.0, nnodes=[2, 2], ckpt_dir="/ck"),
            sup(1, "attempt_start", node, attempt=0, number=0, dir="/ck/logs/r/vm/attempt-000"),
            sup(2, "group_start", node, group=0, workers=1),
            work(4, "session_start", node, 10 + k, rank=k - 1, proc_start=3.0, local_rank=0, world=2),
            *([work(5, "first_step", node, 11, step=1)] if k == 1 else [])])
        hb = tmp_path / f"disk-{k}" / "logs" / "r" / "vm" / "attempt-000" / "heartbeats"
        hb.mkdir(parents=True)
        (hb / f"rank-{k - 1:05d}").write_text(f"step 1 5.000 0 {10 + k}\n")
    st = read_status(tmp_path / "disk-1", tmp_path / "disk-2", now=6.0)
    assert st.state == "running" and [n.label for n in st.nodes] == ["vm launch 1", "vm launch 2"]
    assert [(r.rank, r.node) for r in st.ranks] == [(0, "vm launch 1"), (1, "vm launch 2")]


_NODE_EVENT = st.builds(lambda e, extra: {**e, **extra}, _EVENT, st.fixed_dictionaries({
    "ev": st.sampled_from(["launch", "attempt_start", "group_start", "group_end", "launch_end", "session_start",
                           "restore", "preempted", "signal", "hang", "attempt_end"]),
    "node": st.sampled_from([A, B, C, 7]), "src": st.sampled_from(["supervisor", "worker"]),
    "nnodes": st.sampled_from([[1, 2], [1, 1], "x", [True, 3]]), "group": st.sampled_from([0, 1, "1", None]),
    "dir": st.sampled_from(["/ck/a", "", 3]), "ckpt_dir": st.sampled_from(["/ck", None]),
    "saving": st.one_of(st.none(), st.floats(-1e13, 1e13), st.just(float("inf"))),
    "phase": st.sampled_from(["saving", "step", 1]), "exit_code": st.sampled_from([0, 75, 1, None, "0"]),
    "ending": st.sampled_from(["membership change", "failed", 3])}))


@settings(max_examples=300, deadline=None)
@given(st.lists(_NODE_EVENT, max_size=30), st.floats(0, 2000))
def test_any_multi_node_soup_gives_a_timeline_and_a_status(events: list[dict[str, Any]], now: float) -> None:
    tl = build(events)
    if tl is not None:
        assert sum(tl.buckets.values()) == pytest.approx(tl.wall, abs=1e-6)
        for lane in tl.lanes:
            assert sum(lane.buckets.values()) == pytest.approx(lane.end - lane.start, abs=1e-6)
    status = status_of(events, lambda wanted: {node: {0: beats(0, "saving", 1, now - 1)} for node in wanted}, now)
    assert status.state and all(n.label for n in status.nodes)
