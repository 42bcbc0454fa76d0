"""The event log of a real chaos run accounts for every attempt; ``ftrain status`` follows the live run;
``ftrain goodput`` adds the run up and draws it (issue 15).

One job, two ranks: rank 1 is SIGKILLed during a save at a random step (the supervisor restarts the job),
then `ftrain launch` gets SIGTERM (final save, exit 75), then the same command is relaunched and finishes.
"""
from __future__ import annotations

import json
import random
import signal
import socket
import struct
from pathlib import Path

import pytest

from ftrain import exitcodes
from ftrain.cli import main
from ftrain.events import read_events
from ftrain.telemetry.live import read_status
from ftrain.telemetry.timeline import build

from helpers import EXAMPLE, Launch, assert_no_orphans, launch_env

pytestmark = pytest.mark.slow

STEPS = 60
EVERY = 5


def launch(ckpt: Path, run_id: str, env: dict[str, str]) -> Launch:
    return Launch(["--nproc", "2", "--ckpt-dir", str(ckpt), "--save-every-steps", str(EVERY), "--rdzv-id", run_id,
                   str(EXAMPLE), "--steps", str(STEPS), "--step-sleep", "0.1", "--print-every", "1"], env)


def test_event_log_accounts_for_every_attempt_of_a_chaos_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ck"
    kill_at = random.choice(range(10, 25, EVERY))  # a save step: the kill lands inside the save
    once = tmp_path / "once"
    once.mkdir()
    env = launch_env(FTRAIN_FAULTS=f"kill@save.mid_write:step={kill_at}:rank=1", FTRAIN_FAULTS_ONCE_DIR=str(once),
                     FTRAIN_SUPERVISOR_PROGRESS_SECONDS="1")
    run = launch(ckpt, "gp-a", env)
    run.wait_for(r"worker group 1: 2 worker\(s\) started")  # torchrun restarted the group itself
    run.wait_for(r"^step (3[5-9]|4\d) ", timeout=120)
    # ftrain status against the live run: one restart, stepping, both ranks' heartbeats fresh.
    st = read_status(ckpt)
    # ("saving" when a rank's heartbeat was left in a save's phase: one every 5 steps here; it is running too)
    assert (st.run, st.attempt, st.restarts, st.total_steps) == ("gp-a", 0, 1, STEPS) and st.state in ("running",
                                                                                                    "saving"), st
    assert st.step is not None and st.step >= 30 and st.steps_per_s and st.eta is not None
    assert st.newest_step is not None and st.newest_step >= 30
    assert sorted(r.rank for r in st.ranks) == [0, 1] and all(r.age < 60 for r in st.ranks)
    assert main(["status", str(ckpt)]) == 0
    screen = capsys.readouterr().out
    assert "state      running" in screen and f"of {STEPS}" in screen
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == exitcodes.PREEMPTED, run.output[-4000:]
    assert "running: step" in run.output  # the supervisor's progress line
    again = launch(ckpt, "gp-b", launch_env())
    assert again.wait() == 0, again.output[-4000:]
    assert_no_orphans("gp-a")
    assert_no_orphans("gp-b")

    events = read_events(ckpt)
    dirs = sorted(str(p) for p in (ckpt / "logs").glob("*/*/attempt-*"))
    starts = [e for e in events if e["ev"] == "attempt_start"]
    ends = [e for e in events if e["ev"] == "group_end"]
    assert sorted(e["dir"] for e in starts) == dirs and len(dirs) == 2  # one torchrun per launch, each once
    assert [(e["run"], e["ending"]) for e in ends] == [("gp-a", "failed"), ("gp-a", "preempted"),
                                                       ("gp-b", "finished")]
    assert [e["exit_code"] for e in events if e["ev"] == "launch_end"] == [exitcodes.PREEMPTED, 0]
    (failure,) = [e for e in events if e["ev"] == "failure"]
    # The killed rank, named though it left no error file; torchrun logs only the first failed exit it saw (often a
    # survivor's), so its exit code is known only when it was first.
    assert failure["rank"] == 1 and failure["exit_code"] in (None, -signal.SIGKILL)
    restores = [e["step"] for e in events if e["ev"] == "restore"]
    (final,) = [e["step"] for e in events if e["ev"] == "preempted"]
    assert restores[0] == 0 and restores[1] == kill_at - EVERY and restores[2] == final
    committed = {e["step"] for e in events if e["ev"] == "committed"}
    assert kill_at not in {e["step"] for e in events if e["ev"] == "committed" and e["t"] < failure["t"]}
    assert {*range(EVERY, STEPS + 1, EVERY)} - {kill_at} <= committed | {final}
    assert any(e["ev"] == "signal" and e["name"] == "SIGTERM" for e in events)

    tl = build(events)
    assert tl is not None
    assert tl.counts["attempts"] == 3 and tl.counts["unplanned"] == 1 and tl.counts["preemptions"] == 1
    assert abs(sum(tl.buckets.values()) - tl.wall) < 1e-6
    b = tl.buckets
    assert b["productive"] > 0 and b["lost"] > 0 and b["startup"] > 0 and b["restore"] > 0 and b["save"] > 0
    assert b["down"] > 0  # between the two launches
    host = socket.gethostname()  # two launches of one host: the lanes say which
    # One lane per torchrun (attempt): the kill's restart was torchrun's own, inside attempt 0.
    assert [lane.label for lane in tl.lanes] == [f"{host} launch 1 attempt 0", f"{host} launch 2 attempt 0"]
    assert tl.counts["membership"] == 0  # a single node: its stop was the SIGTERM's preemption

    png = tmp_path / "timeline.png"
    assert main(["goodput", str(ckpt), "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["goodput"] == pytest.approx(tl.goodput, rel=1e-6)
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (report["plot"]["width"], report["plot"]["height"])
    assert main(["goodput", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "goodput" in text and "recommended checkpoint.every_seconds" in text
