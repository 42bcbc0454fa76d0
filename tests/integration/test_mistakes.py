"""Everyday mistakes under `ftrain launch`, with real processes: one clear line, the documented exit code, at once.

Each of these used to burn every restart (three attempts), end in exit 1, and print its message once per rank and
attempt, or a traceback. A permanent error (``FtrainError.permanent``: config, usage, a checkpoint of another model,
a bucket that does not exist) now stops the launch at its first attempt, says it once, and leaves no process.
"""
from __future__ import annotations

import re

import pytest

from ftrain import exitcodes

from helpers import EXAMPLE, ROOT, Launch, assert_no_orphans, launch_env

pytestmark = pytest.mark.slow

BN_SCRIPT = ROOT / "tests" / "integration" / "scripts" / "batchnorm_train.py"


def said(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def assert_stopped_at_once(run: Launch, rc: int, code: int, message: str, run_id: str) -> None:
    out = run.output
    assert rc == code, out[-4000:]
    assert len(said(out, message)) == 1, out[-4000:]  # once: not per rank, not per attempt
    assert len(re.findall(r"started torchrun", out)) <= 1, out[-4000:]  # never restarted
    assert "restarting in" not in out and "Traceback" not in out, out[-4000:]
    assert "SIGABRT" not in out and "terminate called" not in out, out[-4000:]  # every rank exits cleanly
    assert_no_orphans(run_id)


def test_a_malformed_remote_url_is_refused_before_torchrun_starts(tmp_path):
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "c"), "--rdzv-id", "badurl", str(EXAMPLE), "--steps",
                  "4"], launch_env(FTRAIN_CHECKPOINT_REMOTE_URL="s3:/bucket/run"))
    assert_stopped_at_once(run, run.wait(60), exitcodes.USAGE, "checkpoint.remote.url: invalid value 's3:/bucket/run'",
                           "badurl")
    assert "started torchrun" not in run.output


def test_a_global_batch_the_ranks_cannot_split_stops_with_exit_2(tmp_path):
    run = Launch(["--nproc", "3", "--ckpt-dir", str(tmp_path / "c"), "--rdzv-id", "uneven", str(EXAMPLE), "--steps",
                  "4", "--workers", "0"], launch_env())
    assert_stopped_at_once(run, run.wait(120), exitcodes.USAGE, "cannot be split evenly over 3 ranks", "uneven")
    assert "not restarted" in said(run.output, "cannot be split evenly")[0]


def test_a_checkpoint_of_another_model_stops_with_exit_1_naming_the_mismatch(tmp_path):
    ckpt = tmp_path / "c"
    first = Launch(["--nproc", "2", "--ckpt-dir", str(ckpt), "--rdzv-id", "model-a", str(EXAMPLE), "--steps", "5",
                    "--save-every", "5", "--workers", "0"], launch_env())
    assert first.wait(120) == 0, first.output[-4000:]
    other = Launch(["--nproc", "2", "--ckpt-dir", str(ckpt), "--rdzv-id", "model-b", str(BN_SCRIPT), "--ckpt-dir",
                    str(ckpt), "--buffer-log", str(tmp_path / "bn"), "--steps", "4"], launch_env())
    assert_stopped_at_once(other, other.wait(120), exitcodes.FAILURE, "StateMismatch on rank", "model-b")
    [line] = said(other.output, "StateMismatch on rank")
    assert "does not match the registered state" in line and "step 5" in line


def test_a_bucket_that_does_not_exist_stops_at_start_naming_it(tmp_path, s3):
    url = "s3://ftrain-no-such-bucket/run"
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "c"), "--rdzv-id", "nobucket", str(EXAMPLE), "--steps",
                  "4", "--workers", "0"], launch_env(**s3.env(), FTRAIN_CHECKPOINT_REMOTE_URL=url))
    assert_stopped_at_once(run, run.wait(120), exitcodes.USAGE, "the bucket 'ftrain-no-such-bucket' does not exist",
                           "nobucket")
