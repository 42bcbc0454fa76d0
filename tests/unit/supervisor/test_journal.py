"""The supervisor's events carry what the run-inspection tools need (issue 22): where the node saw its checkpoint
directory (its attempt directories, read through another mount), what a hung rank was doing, and whether a rank
was still inside a save when its workers ended."""
from __future__ import annotations

import time
from pathlib import Path

from ftrain.attempt import SAVING, STEPPING, AttemptFiles, HeartbeatWriter
from ftrain.config import CheckpointConfig, FtrainConfig
from ftrain.events import read_events
from ftrain.supervisor.journal import Journal


def beat(files: AttemptFiles, rank: int, phase: str) -> float:
    writer = HeartbeatWriter(files.heartbeat(rank))
    writer.beat(phase, 7)
    writer.close()
    return time.time()


def test_launch_hang_and_group_end_record_the_node_and_the_phase(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(ckpt)))
    journal = Journal(cfg, "r", lambda line: None)
    journal.launch(nproc=2, nnodes=(1, 2), script="train.py", cfg=cfg)
    files = AttemptFiles(ckpt / "logs" / "r" / "h" / "attempt-000")
    files.create()
    journal.attempt_start(0, 0, files, 123)
    stale = beat(files, 3, SAVING)  # a rank of an earlier, larger group: not this group's
    time.sleep(1.1)
    journal.group_start(1, 2)
    beat(files, 0, STEPPING)
    saving = beat(files, 1, SAVING)
    journal.hang(1, "rank 1 made no progress", files)
    journal.group_end(1, "hung", "hang", True)
    journal.close()
    by = {e["ev"]: e for e in read_events(ckpt)}
    assert by["launch"]["ckpt_dir"] == str(ckpt) and by["launch"]["host"]
    assert by["hang"]["phase"] == SAVING and by["hang"]["step"] == 7 and by["hang"]["since"] <= stale + 0.01
    assert saving - 1.0 <= by["group_end"]["saving"] <= saving + 0.01  # this group's save, not the stale rank's
