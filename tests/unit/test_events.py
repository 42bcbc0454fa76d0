"""The event log: appends never block the caller, lines of several writers never interleave, readers skip junk."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from ftrain import events
from ftrain.events import Ev, EventLog, Tail, log_path, read_events


def test_events_round_trip_in_order(tmp_path: Path) -> None:
    log = EventLog(log_path(tmp_path, "run-1"), run="run-1", src="worker")
    for i in range(50):
        log.emit(Ev.PROGRESS, step=i)
    log.close()
    got = read_events(tmp_path)
    assert [e["step"] for e in got] == list(range(50))
    assert all(e["run"] == "run-1" and e["ev"] == "progress" for e in got)


def test_emit_never_blocks_on_a_stuck_file(tmp_path: Path) -> None:
    # A FIFO with no reader: opening it for writing blocks the writer thread forever, like a hung filesystem.
    path = log_path(tmp_path, "stuck")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    log = EventLog(path, run="stuck")
    # Returning at all is the check: the writer thread is stuck in open() for as long as no reader comes.
    for i in range(events.MAX_QUEUED + 500):
        log.emit(Ev.PROGRESS, step=i)
    assert log.dropped == 500  # bounded memory: the excess is dropped and counted
    assert log.flush(0.2) is False  # and flush gives up at its timeout
    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # let the writer thread out (it then fails, and drops)


def test_an_unwritable_directory_drops_events_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    blocker = tmp_path / "events"
    blocker.write_text("a file where the directory should be")
    log = EventLog(log_path(tmp_path, "r"), run="r")
    for i in range(20):
        log.emit(Ev.PROGRESS, step=i)
    assert log.flush(2.0)
    log.close()
    # This log's own: the stuck-FIFO test's writer thread may fail (and warn) while this test runs.
    warnings = [r for r in caplog.records if "cannot write the event log" in r.getMessage()
                and str(tmp_path) in r.getMessage()]
    assert len(warnings) == 1


def _writer(path: str, who: int) -> None:
    log = EventLog(Path(path), run="r", src=f"p{who}")
    for i in range(2000):
        log.emit(Ev.PROGRESS, step=i, pad="x" * (who * 37 % 300))
        if i % 100 == 0:
            time.sleep(0.001)
    log.close(timeout=10.0)


@pytest.mark.slow  # starts processes
def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = log_path(tmp_path, "r")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    raw = path.read_bytes().splitlines()
    assert len(raw) == 8000
    assert all(events.parse_line(line + b"\n") is not None for line in raw)
    by = {}
    for e in read_events(tmp_path):
        by.setdefault(e["src"], []).append(e["step"])
    assert {k: sorted(v) for k, v in by.items()} == {f"p{w}": list(range(2000)) for w in range(4)}


def test_readers_skip_torn_hostile_and_oversized_lines(tmp_path: Path) -> None:
    path = log_path(tmp_path, "r")
    path.parent.mkdir(parents=True)
    good = json.dumps({"t": 1.0, "ev": "launch"})
    lines = [good, "not json", "[1, 2]", json.dumps({"t": "soon", "ev": "x"}), json.dumps({"t": float("nan"),
             "ev": "x"}).replace("NaN", "NaN"), json.dumps({"t": True, "ev": "x"}), json.dumps({"ev": "x"}),
             "[" * 100000, json.dumps({"t": 2.0, "ev": "x", "pad": "y" * (events.MAX_LINE_BYTES + 1)}),
             json.dumps({"t": 3.0, "ev": "attempt_start"})]
    path.write_text("\n".join(lines) + "\n" + json.dumps({"t": 4.0, "ev": "torn"})[:-3])
    (tmp_path / "events" / "link.jsonl").symlink_to(path)  # read once, not twice through a link
    assert [e["ev"] for e in read_events(tmp_path)] == ["launch", "attempt_start"]


def test_tail_returns_only_new_whole_lines(tmp_path: Path) -> None:
    path = log_path(tmp_path, "r")
    path.parent.mkdir(parents=True)
    tail = Tail(path)
    assert tail.new() == []
    with open(path, "a") as f:
        f.write(json.dumps({"t": 1.0, "ev": "a"}) + "\n" + '{"t": 2.0, "ev"')
    assert [e["ev"] for e in tail.new()] == ["a"]
    with open(path, "a") as f:
        f.write(': "b"}\n')
    assert [e["ev"] for e in tail.new()] == ["b"]
    assert tail.new() == []


def test_emit_from_many_threads_loses_nothing(tmp_path: Path) -> None:
    log = EventLog(log_path(tmp_path, "r"), run="r")

    def spam(k: int) -> None:
        for i in range(500):
            log.emit(Ev.PROGRESS, step=k * 1000 + i)

    threads = [threading.Thread(target=spam, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close(timeout=10.0)
    assert sorted(e["step"] for e in read_events(tmp_path)) == sorted(k * 1000 + i for k in range(4)
                                                                      for i in range(500))


def test_run_ids_become_one_file_name(tmp_path: Path) -> None:
    assert log_path(tmp_path, "../../etc/passwd").parent == tmp_path / "events"
    assert log_path(tmp_path, "a/b").name == "a_b.jsonl"


def test_several_roots_merge_in_time_order_and_read_each_file_once(tmp_path: Path) -> None:
    """Node-local disks: a log per node, merged; the same file reached twice (a shared directory given twice, or
    through another path) is read once, and an event in two files (a copy of a node's log) counts once."""
    for node, times in (("a", (1.0, 3.0)), ("b", (2.0, 4.0))):
        path = log_path(tmp_path / node, "r")
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"t": t, "ev": "progress", "run": "r", "node": node, "step": int(t)})
                                + "\n" for t in times))
    (tmp_path / "a-again").symlink_to(tmp_path / "a")
    (tmp_path / "copy" / "events").mkdir(parents=True)
    (tmp_path / "copy" / "events" / "r.jsonl").write_bytes(log_path(tmp_path / "b", "r").read_bytes())
    got = read_events(tmp_path / "a", tmp_path / "b", tmp_path / "a-again", tmp_path / "copy", tmp_path / "none")
    assert [(e["node"], e["t"]) for e in got] == [("a", 1.0), ("b", 2.0), ("a", 3.0), ("b", 4.0)]
