"""Preemption notices end to end: `ftrain launch` watching a fake cloud metadata service on 127.0.0.1, or the
drain file, stops the job with exactly one final checkpoint and exit 75, and logs the notice's deadline. With a
cloud's notice the checkpoint also has a remote tier (a real S3 server, moto, on 127.0.0.1): the final checkpoint
must be durable there before the exit, and the deadline line must say so.

The notice comes at a random moment after training started (the fake serves "no notice" until the test
triggers it). Azure's event must be acknowledged once, and only after the final checkpoint committed.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fake_clouds import FakeAws, FakeAzure, FakeCloud, FakeGcp

from ftrain import exitcodes
from ftrain.checkpoint.store import open_store

from helpers import EXAMPLE, Launch, assert_no_orphans, job_processes, launch_env

pytestmark = pytest.mark.slow

FAKES: dict[str, type[FakeCloud]] = {"aws": FakeAws, "gcp": FakeGcp, "azure": FakeAzure}


def launch(ckpt: Path, run_id: str, **env: str) -> Launch:
    return Launch(["--nproc", "1", "--ckpt-dir", str(ckpt), "--save-every-steps", "100000", "--grace-seconds", "60",
                   "--rdzv-id", run_id, str(EXAMPLE), "--steps", "100000", "--step-sleep", "0.02",
                   "--print-every", "1", "--workers", "0"],
                  launch_env(FTRAIN_SUPERVISOR_NOTICES_POLL_SECONDS="0.1", **env))


def steps_in(ckpt: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in ckpt.iterdir() if p.name.startswith("step-"))


@pytest.mark.parametrize("source", ["aws", "gcp", "azure", "drain"])
def test_a_notice_gives_one_final_checkpoint_and_exit_75(tmp_path: Path, source: str, s3, monkeypatch) -> None:
    ckpt = tmp_path / "ckpt"
    run_id = f"notice-{source}"
    fake = FAKES[source]() if source in FAKES else None
    run: Launch | None = None
    try:
        env = {"FTRAIN_SUPERVISOR_NOTICES_SOURCES": source}
        url = None
        if fake is not None:
            env[f"FTRAIN_SUPERVISOR_NOTICES_{source.upper()}_METADATA_URL"] = fake.url
            url = f"s3://{s3.make_bucket()}/{run_id}"
            env.update(s3.env(), FTRAIN_CHECKPOINT_REMOTE_URL=url)
            for k, v in s3.env().items():  # this process reads the remote tier too, at the end
                monkeypatch.setenv(k, v)
        run = launch(ckpt, run_id, **env)
        run.wait_for(r"^step \d+ ", timeout=120)
        assert job_processes(run_id), "no worker is running"
        time.sleep(random.uniform(0.0, 1.5))  # a random moment in training
        noticed = time.time()
        if fake is not None:
            fake.trigger()
        else:
            (ckpt / "DRAIN").touch()
        rc = run.wait(timeout=90)
        out = run.output
        assert rc == exitcodes.PREEMPTED, out[-4000:]
        [attempt] = (ckpt / "logs" / run_id).glob("*/attempt-000")
        marker = json.loads((attempt / "preempted.json").read_text())
        assert steps_in(ckpt) == [marker["step"]], (steps_in(ckpt), out[-4000:])  # exactly one: the final save
        assert marker["time"] >= noticed
        assert json.loads((attempt / "stop.json").read_text())["signal"] == f"{source} notice"
        # The notice, its deadline, and whether the final checkpoint was durable before it.
        if source == "drain":
            assert re.search(r"drain notice: drain file .*DRAIN exists; no deadline announced; stopping", out), out
        else:
            assert re.search(rf"{source} notice: .*; deadline \S+Z \(in \d+s\); stopping", out), out[-4000:]
            assert re.search(rf"{source} notice: deadline \S+Z; final checkpoint at step {marker['step']} durable "
                             r"\(remote\) at \S+Z, [\d.]+s before the deadline", out), out[-4000:]
            assert noticed <= marker["remote_time"] <= marker["time"]  # uploaded, then the marker written
            assert [m.step for m in open_store(url).candidates()] == [marker["step"]], "not durable remotely"
        assert "cannot reach" not in out and "malformed" not in out and "stopping now" not in out, out[-4000:]
        if isinstance(fake, FakeAzure):
            assert [doc for _, doc in fake.acks] == [{"StartRequests": [{"EventId": FakeAzure.EVENT_ID}]}]
            assert fake.acks[0][0] >= marker["time"], "acknowledged before the final checkpoint committed"
        if isinstance(fake, FakeAws):
            assert all(h.get("x-aws-ec2-metadata-token") for _, m, p, h in fake.requests if m == "GET"), \
                "an IMDSv2 GET without the token"
        assert_no_orphans(run_id)
    finally:
        if run is not None and run.proc.poll() is None:  # a failed check: leave nothing running
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.wait(timeout=90)
            except subprocess.TimeoutExpired:
                run.proc.kill()
        if fake is not None:
            fake.close()


def test_an_existing_drain_file_at_launch_starts_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "DRAIN").touch()
    run = launch(ckpt, "notice-drained", FTRAIN_SUPERVISOR_NOTICES_SOURCES="drain")
    assert run.wait(timeout=120) == exitcodes.PREEMPTED, run.output[-4000:]
    assert "exists: not starting the job; remove it and relaunch" in run.output
    assert "started torchrun" not in run.output
    assert_no_orphans("notice-drained")
