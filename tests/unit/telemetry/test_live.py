"""``ftrain status`` and the progress line on synthetic event logs (the live run: tests/integration/test_goodput.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from event_logs import crash_then_success

from ftrain.attempt import Heartbeat
from ftrain.cli import main
from ftrain.telemetry.live import format_status, progress_line, status_of


def upto(t: float) -> list[dict]:
    return [e for e in crash_then_success() if e["t"] <= t]


@pytest.mark.parametrize(("t", "state"), [(1.0, "no events"), (2.0, "starting"), (6.2, "restoring"),
                                          (16.0, "running"), (25.0, "backoff"), (27.0, "starting"),
                                          (33.0, "running"), (46.2, "finished")])
def test_state_follows_the_run(t: float, state: str) -> None:
    assert status_of(upto(t), {}, t).state == state


def test_running_status_has_step_rate_eta_checkpoint_and_restarts() -> None:
    events = upto(41.5)
    beats = {"hostA/100": {0: Heartbeat("step", 31, 41.0), 1: Heartbeat("step", 31, 38.0)}}
    st = status_of(events, beats, 42.0)
    assert (st.attempt, st.state, st.restarts, st.budget, st.world) == (1, "running", 1, 3, 2)
    assert st.step == 31  # the heartbeats are ahead of the last event
    assert st.steps_per_s == pytest.approx((30 - 21) / (41.0 - 32))
    assert st.total_steps == 40
    assert st.eta == pytest.approx((40 - 31) / st.steps_per_s)
    assert (st.newest_step, st.newest_age) == (30, pytest.approx(0.5))
    assert [(r.rank, r.age) for r in st.ranks] == [(0, 1.0), (1, 4.0)]
    assert st.recent == ["attempt 0 failed: rank 1 exited with signal SIGKILL"]
    line = progress_line(st)
    assert line.startswith("attempt 1 running: step 31/40 (") and "restarts 1/3" in line and "ETA" in line
    screen = format_status(st, "/ck")
    assert "rank 1: step 31, 4s ago" in screen and "restarts   1 of 3" in screen


def test_status_command_and_hostile_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "events").mkdir()
    events = upto(30)
    events[12]["detail"] = "rank 1 \x1b[2J\x1b]0;owned\x07 died"  # the failure text, as a hostile file has it
    (tmp_path / "events" / "r.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "state      restoring" in out and "\x1b" not in out and "\\x1b[2J" in out
    assert main(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attempt"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["status", str(empty)]) == 1
    assert "no event log" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "missing")]) == 2


def test_goodput_command_on_a_log_and_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "r.jsonl").write_text("".join(json.dumps(e) + "\n" for e in crash_then_success()))
    assert main(["goodput", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "goodput 58.4%" in out  # (13.3 + 13.7) / 46.2 s (test_timeline.py)
    assert "lost" in out and "recommended checkpoint.every_seconds" in out
    assert "membership change" not in out  # a single node: none to mention
    assert main(["goodput", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(report["buckets"].values()) == pytest.approx(report["wall_seconds"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["goodput", str(empty)]) == 2
    assert main(["goodput", str(tmp_path), "--mtbf", "-5"]) == 2
    err = capsys.readouterr().err
    assert "no events under" in err and "--mtbf must be a positive number" in err
