"""launcher/skypilot/train.yaml: its recovery policy matches ftrain's exit codes, it sets only keys ftrain knows, and
its run script builds the launch each node needs (run by bash here, with a stand-in `ftrain` that records its
arguments; SkyPilot itself is not installed)."""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from ftrain import envvars, exitcodes
from ftrain.config import FtrainConfig, config_to_env

from helpers import ROOT

RECIPE = ROOT / "launcher" / "skypilot" / "train.yaml"


def recipe() -> dict[str, object]:
    data = yaml.safe_load(RECIPE.read_text())
    assert isinstance(data, dict)
    return data


def test_only_a_resumable_stop_is_recovered() -> None:
    recovery = recipe()["resources"]["job_recovery"]  # type: ignore[index]
    # 75 is the one resumable exit; 1 (gave up) and 2 (bad input) must not be retried, which
    # max_restarts_on_errors > 0 would do; 137 is SkyPilot's own.
    assert recovery["recover_on_exit_codes"] == [exitcodes.PREEMPTED]
    assert recovery["max_restarts_on_errors"] == 0
    assert recipe()["resources"]["use_spot"] is True  # type: ignore[index]


def test_every_ftrain_variable_it_sets_is_one_ftrain_reads() -> None:
    known = set(config_to_env(FtrainConfig())) | {v for k, v in vars(envvars).items() if k.isupper()}
    used = set(re.findall(r"\b(FTRAIN_[A-Z_]+)=", str(recipe()["run"])))
    assert used and used <= known, used - known


def _ftrain_stub(tmp_path: Path, rc: int) -> Path:
    """A directory with an `ftrain` that records its arguments and remote URL, and exits ``rc``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "ftrain"
    stub.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/calls\necho "$FTRAIN_CHECKPOINT_REMOTE_URL" '
                    f'>> {tmp_path}/remote\n[[ $1 == rendezvous ]] && exec sleep 30\nexit {rc}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(tmp_path: Path, rc: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{_ftrain_stub(tmp_path, rc)}:{os.environ['PATH']}", "HOME": str(tmp_path),
            "SKYPILOT_TASK_ID": "sky-managed-2026-12-08_01-02-03_123456_my-run_7-0", "SKYPILOT_NUM_NODES": "1",
            "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_GPUS_PER_NODE": "8",
            **{k: str(v) for k, v in recipe()["envs"].items()}, "BUCKET": "s3://b/ftrain"}  # type: ignore[union-attr]
    return subprocess.run(["bash", "-c", str(recipe()["run"])], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_one_node_launches_with_the_task_id_as_the_remote_prefix(tmp_path: Path) -> None:
    out = run_script(tmp_path, rc=exitcodes.PREEMPTED)
    assert out.returncode == exitcodes.PREEMPTED, out.stderr  # SkyPilot sees ftrain's own code
    assert (tmp_path / "calls").read_text().split() == ["launch", "--nproc", "8", "--grace-seconds", "25",
                                                        "train.py", "--steps", "100000"]
    assert (tmp_path / "remote").read_text().strip() == "s3://b/ftrain/sky-managed-2026-12-08_01-02-03_123456_my-run_7-0"


@pytest.mark.slow
def test_a_second_node_waits_for_the_heads_store_and_joins_it(tmp_path: Path) -> None:
    with socket.socket() as store:  # the head's `ftrain rendezvous`, as far as the second node can tell
        store.bind(("127.0.0.1", 0))
        store.listen()
        port = store.getsockname()[1]
        out = run_script(tmp_path, SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1",
                         SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.3", RDZV_PORT=str(port))
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().split()
    assert calls[:1] == ["launch"] and "rendezvous" not in calls  # only the head hosts the store
    i = calls.index("--nnodes")
    assert calls[i:i + 9] == ["--nnodes", "2:2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                              "--rdzv-id", "sky-managed-2026-12-08_01-02-03_123456_my-run_7-0", "train.py"]


@pytest.mark.slow
def test_no_bucket_is_bad_input_and_not_recovered(tmp_path: Path) -> None:
    out = run_script(tmp_path, BUCKET="")
    assert out.returncode == exitcodes.USAGE and "set BUCKET" in out.stderr
    assert not (tmp_path / "calls").exists()
