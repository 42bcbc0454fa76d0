"""Retention and quarantine on real checkpoints damaged on disk (issue 22): the ``keep_last`` newest *valid*
checkpoints are always kept, a damaged one never counts, and what is damaged as a whole is set aside as
``damaged-step-N`` (by restore, by retention), never a part of a checkpoint whose rest is on other disks."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import ftrain
from ftrain.checkpoint import format as fmt
from ftrain.checkpoint import retention
from ftrain.checkpoint.store import CheckpointStore

from helpers import Job, cfg, reseal


def session_for(root: Path, **kw: Any) -> tuple[Job, ftrain.Session]:
    job = Job()
    session = ftrain.Session(cfg(root, **kw))
    job.register(session)
    return job, session


def save_steps(job: Job, session: ftrain.Session, steps: range) -> None:
    for step in steps:
        job.train(1)
        session.step(step)


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """An earlier run's checkpoints at steps 100, 101 and 102, in a root of their own."""
    root = tmp_path / "old"
    job, session = session_for(root, every_steps=1, keep_last=0)
    session.restore()
    save_steps(job, session, range(100, 103))
    session.close()
    return root


def damage(root: Path) -> None:
    """Steps 100-102 damaged three ways: an ill-typed ``meta.replicated`` (resealed), ``meta.frozen`` a string
    (resealed), and a flipped byte in a shard (same size: only reading it shows it)."""
    reseal(root / fmt.step_dirname(100) / fmt.MANIFEST, lambda b: b["meta"].update(replicated=5))
    reseal(root / fmt.step_dirname(101) / fmt.MANIFEST, lambda b: b["meta"].update(frozen="x"))
    shard = root / fmt.step_dirname(102) / fmt.shard_names(0)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def valid_steps(store: CheckpointStore) -> list[int]:
    return [i.step for i in store.infos() if i.valid]


def quarantined(store: CheckpointStore) -> dict[int, str]:
    return {q.step: q.note for q in retention.quarantined(store)}


def test_a_new_run_over_damaged_newer_checkpoints_keeps_its_newest_valid_ones(old_run: Path) -> None:
    """The issue's case: a run with keep_last 2 saving steps 1-4 over damaged 100-102 used to end with only step 4
    valid. Restore tries 102, 101, 100, finds each damaged and sets it aside; retention then counts 3 and 4."""
    damage(old_run)
    job, session = session_for(old_run, every_steps=1, keep_last=2)
    assert session.restore() == 0  # nothing valid to resume from
    save_steps(job, session, range(1, 5))
    session.close()
    store = CheckpointStore(old_run)
    assert store.steps() == [3, 4] and valid_steps(store) == [3, 4]
    notes = quarantined(store)
    assert sorted(notes) == [100, 101, 102] and all("restore: " in n for n in notes.values())
    assert "meta.replicated" in notes[100] and "meta.frozen" in notes[101] and "shard-00000.bin" in notes[102]
    assert (old_run / fmt.quarantine_dirname(102) / (fmt.shard_names(0)[1] + fmt.DAMAGED_SUFFIX)).is_file()


def test_retention_alone_never_counts_damaged_checkpoints_and_sets_them_aside(old_run: Path, tmp_path: Path) -> None:
    """Damaged checkpoints restore never saw (they arrived after it): retention's own checks keep them from
    counting, whatever their step, and it quarantines them; a save in progress (``.tmp-``) is not touched."""
    reseal(old_run / fmt.step_dirname(100) / fmt.MANIFEST, lambda b: b["meta"].update(replicated=[[1]]))
    (old_run / fmt.step_dirname(101) / fmt.MANIFEST).unlink()
    with open(old_run / fmt.step_dirname(102) / fmt.shard_names(0)[1], "r+b") as f:
        f.truncate(16)
    root = tmp_path / "new"
    job, session = session_for(root, every_steps=1, keep_last=2)
    assert session.restore() == 0
    for step in (100, 101, 102):
        shutil.copytree(old_run / fmt.step_dirname(step), root / fmt.step_dirname(step))
    in_progress = root / f"{fmt.tmp_dirname(7, 'feedfacefeedface')}"
    in_progress.mkdir()
    save_steps(job, session, range(1, 5))
    session.close()
    store = CheckpointStore(root)
    assert store.steps() == [3, 4] and valid_steps(store) == [3, 4]
    notes = quarantined(store)
    assert sorted(notes) == [100, 101, 102] and all("retention: " in n for n in notes.values())
    assert in_progress.is_dir()


def test_valid_checkpoints_of_newer_steps_still_count(old_run: Path, tmp_path: Path) -> None:
    """Only damage stops a checkpoint from counting: valid ones at higher steps (the next restore would resume
    from them) are the newest, and retention keeps them rather than the run's older steps."""
    root = tmp_path / "new"
    job, session = session_for(root, every_steps=1, keep_last=2)
    assert session.restore() == 0
    for step in (100, 101):
        shutil.copytree(old_run / fmt.step_dirname(step), root / fmt.step_dirname(step))
    save_steps(job, session, range(1, 4))
    session.close()
    store = CheckpointStore(root)
    assert store.steps() == [3, 100, 101] and valid_steps(store) == [3, 100, 101] and quarantined(store) == {}


def test_quarantine_names_and_a_part_is_not_damage(old_run: Path) -> None:
    store = CheckpointStore(old_run)
    assert retention.quarantine(store, 100, "test") == fmt.quarantine_dirname(100)
    shutil.copytree(old_run / fmt.step_dirname(101), old_run / fmt.step_dirname(100))
    assert retention.quarantine(store, 100, "again") == fmt.quarantine_dirname(100, 2) == "damaged-step-000000000100-2"
    assert [(q.step, q.note.split(" ", 1)[1]) for q in retention.quarantined(store)] == [(100, "test"), (100, "again")]
    assert fmt.parse_quarantine_dirname("damaged-step-000000000100-2") == 100
    assert fmt.parse_step_dirname(fmt.quarantine_dirname(100)) is None and not fmt.is_garbage("damaged-step-1")
    assert store.steps() == [101, 102]

    # Step 102 as one disk's part of a two-disk checkpoint, its own shard truncated: a damaged copy (a replica may
    # repair it), not a damaged checkpoint. Retention keeps 101, neither counts nor renames 102, and deletes the
    # quarantined copies of 100: older than every kept checkpoint, retention would have deleted them anyway.
    def two_disks(body: dict[str, Any]) -> None:
        for name in fmt.shard_names(0):
            body["files"][name.replace("00000", "00001")] = dict(body["files"][name], rank=1)
        body.update(world_size=2, placement={store.disk: [0], "b" * 32: [1]})

    reseal(old_run / fmt.step_dirname(102) / fmt.MANIFEST, two_disks)
    assert store.assess(102).valid  # rank 1's files are on the other disk: a part, and intact
    with open(old_run / fmt.step_dirname(102) / fmt.shard_names(0)[1], "r+b") as f:
        f.truncate(16)
    verdict = store.assess(102)
    assert not verdict.valid and not verdict.damaged
    assert retention.prune(store, 1, protect=set()) == []
    assert store.steps() == [101, 102] and quarantined(store) == {}
