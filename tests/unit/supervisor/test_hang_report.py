"""Pure parts of the supervisor, tested without processes: hang detection and the root-cause report."""
from __future__ import annotations

import dataclasses

from ftrain.attempt import RESTORING, SAVING, STEPPING, ErrorRecord, Heartbeat
from ftrain.supervisor.hang import HangLimits, find_hung
from ftrain.supervisor.report import format_report, parse_torchrun_root_cause, root_cause
from ftrain.supervisor.supervisor import strip_prefix

LIMITS = HangLimits(hang_timeout=10, startup_timeout=100, save_timeout=50, exit_timeout=30)

TORCHRUN_TAIL = """\
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 9082)  (SIGTERM)
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_19:49:03
  host      : localhost
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 9083)  (SIGKILL)
  error_file: <N/A>
""".splitlines()


def test_no_hang_while_everyone_is_fresh():
    beats = {r: Heartbeat(STEPPING, 5, 1000.0) for r in range(4)}
    assert find_hung(beats, 4, started_at=900, now=1005, limits=LIMITS) is None


def test_stale_rank_is_reported_and_the_laggard_is_named():
    beats = {0: Heartbeat(STEPPING, 7, 1000.0), 1: Heartbeat(STEPPING, 6, 1000.0), 2: Heartbeat(STEPPING, 7, 1000.0)}
    verdict = find_hung(beats, 3, started_at=900, now=1011, limits=LIMITS)
    assert verdict is not None and verdict.startswith("rank 1 ") and "step 6" in verdict


def test_saving_and_restoring_get_their_own_allowance():
    assert find_hung({0: Heartbeat(SAVING, 7, 1000.0)}, 1, 900, 1040, LIMITS) is None
    assert find_hung({0: Heartbeat(SAVING, 7, 1000.0)}, 1, 900, 1051, LIMITS) is not None
    assert find_hung({0: Heartbeat(RESTORING, 0, 1000.0)}, 1, 900, 1090, LIMITS) is None


def test_missing_heartbeats_use_the_startup_allowance():
    assert find_hung({}, 2, started_at=1000, now=1099, limits=LIMITS) is None
    assert "never reported" in (find_hung({}, 2, started_at=1000, now=1101, limits=LIMITS) or "")


def test_disabled_detection():
    off = HangLimits(hang_timeout=0, startup_timeout=1, save_timeout=1, exit_timeout=1)
    assert find_hung({0: Heartbeat(STEPPING, 1, 0.0)}, 1, 0, 10_000, off) is None


def test_torchrun_root_cause_is_parsed():
    assert parse_torchrun_root_cause(TORCHRUN_TAIL) == (3, 1, -9)
    assert parse_torchrun_root_cause(["nothing here"]) == (None, None, None)


def test_signal_death_beats_the_error_files_of_stranded_ranks():
    errors = {0: ErrorRecord(time=5.0, exc_type="RuntimeError", message="Connection closed by peer")}
    f = root_cause(2, TORCHRUN_TAIL, errors, None)
    assert (f.rank, f.exit_code, f.exc_type) == (3, -9, None)
    assert f.describe() == "rank 3 exited with signal SIGKILL"


def test_earliest_error_file_wins_over_a_bystander_exit_code():
    tail = [ln.replace("-9 (pid: 9083)  (SIGKILL)", "1 (pid: 9083)") for ln in TORCHRUN_TAIL]
    errors = {1: ErrorRecord(time=9.0, exc_type="RuntimeError", message="peer closed", traceback="x"),
              2: ErrorRecord(time=4.0, exc_type="ValueError", message="boom",
                             traceback="Traceback...\nValueError: boom")}
    f = root_cause(0, tail, errors, None)
    assert (f.rank, f.exc_type, f.message) == (2, "ValueError", "boom")


def test_a_signal_death_beats_a_survivor_torchrun_happened_to_see_first():
    # The survivor's collective failed within 0.2 s of its peer's SIGKILL and torchrun saw that exit first:
    # its summary names the survivor as the first failure and lists the killed rank among the others.
    tail = """\
Failures:
[1]:
  time      : 2026-12-02_05:51:02
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 8457)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_05:51:02
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 8456)
""".splitlines()
    errors = {0: ErrorRecord(time=1.0, exc_type="RuntimeError",
                             message="[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: "
                                     "Connection reset by peer")}
    f = root_cause(0, tail, errors, None)
    assert (f.rank, f.exit_code, f.exc_type) == (1, -9, None)
    assert f.describe() == "rank 1 exited with signal SIGKILL"
    # A survivor's own bug (not a collective error) stays the root cause.
    errors[0] = dataclasses.replace(errors[0], message="boom")
    assert root_cause(0, tail, errors, None).rank == 0


def test_report_fits_on_one_screen():
    errors = {1: ErrorRecord(time=1.0, exc_type="ValueError", message="boom",
                             traceback="\n".join(f"line {i}" for i in range(200)))}
    failures = [root_cause(a, [], errors, None) for a in range(20)]
    text = format_report("gave up", failures, [f"#{a} failed" for a in range(20)], "/logs", 40)
    assert len(text.splitlines()) <= 30
    assert "root cause (attempt 19): rank 1 (ValueError: boom)" in text and "line 199" in text and "step 40" in text


def test_rank_prefix_is_stripped_for_rank_0_only():
    assert strip_prefix("@@ftrain-rank0@@final_state_sha256=ab\n") == "final_state_sha256=ab\n"
    assert strip_prefix("@@ftrain-rank3@@hello\n") == "[rank 3] hello\n"
    assert strip_prefix("torchrun says\n") == "torchrun says\n"


def test_a_script_reports_when_it_imports_ftrain(tmp_path) -> None:
    from ftrain.supervisor.hang import reports_progress

    cases = {"a.py": "import ftrain\n", "b.py": "import os\nfrom ftrain.session import Session\n",
             "c.py": "import torch\n# import ftrain (a comment)\nx = 'import ftrain'\n", "d.py": "import ftrainer\n",
             "e.py": "import os, torch.distributed as dist, ftrain\n", "f.py": "import numpy as np, ftrain.session\n",
             "g.py": "import os, ftrainer\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert [reports_progress(tmp_path / n) for n in cases] == [True, True, False, False, True, True, False]
    assert reports_progress(tmp_path / "missing.py")  # unknown: every check stays on
