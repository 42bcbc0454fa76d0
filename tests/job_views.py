"""What `ftrain status` and `ftrain goodput` must say of a real multi-node job (issue 22), checked on the directories
the multi-node integration tests leave behind (one shared directory, or one per node-local disk): no new launches.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from ftrain.cli import main
from ftrain.events import read_events
from ftrain.telemetry.live import Status, read_status
from ftrain.telemetry.timeline import Timeline, build


def check_goodput(dirs: list[Path], capsys: pytest.CaptureFixture[str]) -> tuple[Timeline, list[dict[str, Any]]]:
    """The job over every directory: one lane per node labelled ``<host> launch <n>``, each adding up and showing
    no work before its own workers started; no preemption where no supervisor got a signal or a notice."""
    events = read_events(*dirs)
    tl = build(events)
    assert tl is not None
    assert sum(tl.buckets.values()) == pytest.approx(tl.wall)
    host = socket.gethostname()
    launches = sorted({e["node"] for e in events if e["ev"] == "launch"})
    assert sorted(lane.node for lane in tl.lanes) == launches
    assert [lane.label for lane in tl.lanes] == [f"{host} launch {k}" for k in range(1, len(launches) + 1)]
    for lane in tl.lanes:
        assert sum(lane.buckets.values()) == pytest.approx(lane.end - lane.start)
        assert lane.segments[0].bucket == "startup", lane.label  # the launcher's own start
        starts = [e["proc_start"] for e in events if e["ev"] == "session_start" and e["node"] == lane.node]
        begun = min(starts, default=lane.end)
        assert all(s.start >= begun for s in lane.segments if s.bucket in ("productive", "restore", "lost")), \
            lane.label
    if not any(e["ev"] in ("signal", "notice") for e in events):
        assert tl.counts["preemptions"] == 0, tl.counts  # torchrun's stops at a scale-up are membership changes
    capsys.readouterr()  # what the test printed before
    assert main(["goodput", *map(str, dirs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["buckets"] == pytest.approx(tl.buckets)
    assert [lane["label"] for lane in report["lanes"]] == [lane.label for lane in tl.lanes]
    return tl, events


def wait_for_ranks(dirs: list[Path], world: int, nodes: int, timeout: float = 60) -> Status:
    """``ftrain status`` over ``dirs`` until it shows ``world`` ranks' fresh heartbeats from ``nodes`` nodes."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_status(*dirs)
        fresh = [r for r in st.ranks if r.age < 30]
        if sorted(r.rank for r in fresh) == list(range(world)) and len({r.node for r in fresh}) == nodes:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"ftrain status never showed {world} ranks on {nodes} nodes: {st}")
        time.sleep(0.5)


def node_states(st: Status) -> list[str]:
    return sorted(n.state for n in st.nodes)
