"""In-process tests of the Session API, the corruption matrix, fallback and retention."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import format as layout
from ftrain.cli import main as cli
from ftrain.errors import CheckpointDirError, CheckpointError, NoValidCheckpoint, StateMismatch

from helpers import Job, cfg


def run_to(path: Path, steps: int, every: int = 10, **kw) -> tuple[Job, ftrain.Session, dict[int, dict]]:
    job = Job()
    session = ftrain.Session(cfg(path, every_steps=every, **kw))
    job.register(session)
    start = session.restore()
    snaps = {}
    for step in range(start + 1, steps + 1):
        job.train(1)
        if session.step(step):
            snaps[step] = job.snapshot()
    session.close()
    return job, session, snaps


def test_restore_is_exact_including_rng_and_counters(tmp_path):
    ref, _, _ = run_to(tmp_path / "a", 25)
    ref_next = torch.rand(3)
    _, _, _ = run_to(tmp_path / "b", 17)  # "crash" after step 17; checkpoint at 10
    job = Job()
    session = ftrain.Session(cfg(tmp_path / "b", every_steps=10))
    job.register(session)
    assert session.restore() == 10
    job.train(15)
    assert job.counters.seen == ref.counters.seen == 50
    for k, v in ref.model.state_dict().items():
        assert torch.equal(job.model.state_dict()[k], v)
    assert torch.equal(torch.rand(3), ref_next)  # the RNG stream continues exactly


def damage_truncate(d: Path) -> str:
    f = d / "shard-00000.bin"
    f.write_bytes(f.read_bytes()[:-100])
    return "shard-00000.bin: size"


def damage_flip_bin(d: Path) -> str:
    f = d / "shard-00000.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    return "shard-00000.bin: checksum mismatch"


def damage_flip_json(d: Path) -> str:
    f = d / "shard-00000.json"
    data = bytearray(f.read_bytes())
    data[10] ^= 0x20
    f.write_bytes(bytes(data))
    return "shard-00000.json: checksum mismatch"


def damage_missing_manifest(d: Path) -> str:
    (d / "manifest.json").unlink()
    return "manifest.json: manifest missing"


def damage_missing_file(d: Path) -> str:
    (d / "shard-00000.bin").unlink()
    return "shard-00000.bin: file listed in the manifest is missing"


def damage_garbage_manifest(d: Path) -> str:
    (d / "manifest.json").write_bytes(b"\x8b\x00not json at all")
    return "manifest.json: manifest is not valid JSON"


def damage_flip_manifest(d: Path) -> str:
    f = d / "manifest.json"
    f.write_text(f.read_text().replace('"world_size": 1', '"world_size": 2'))
    return "manifest.json: manifest checksum mismatch"


DAMAGE = [damage_truncate, damage_flip_bin, damage_flip_json, damage_missing_manifest, damage_missing_file,
          damage_garbage_manifest, damage_flip_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.removeprefix("damage_"))
def test_corruption_is_detected_and_restore_falls_back(tmp_path, damage, capsys, caplog):
    root = tmp_path / "ckpt"
    _, _, snaps = run_to(root, 20)
    expected = damage(root / layout.step_dirname(20))

    assert cli(["ckpt", "verify", str(root), "20"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and expected in out, out
    assert cli(["ckpt", "verify", str(root)]) == 1
    assert cli(["ckpt", "verify", str(root), "10"]) == 0
    capsys.readouterr()
    assert cli(["ckpt", "ls", str(root)]) == 0
    assert expected.split(":")[0] in capsys.readouterr().out

    job = Job()
    session = ftrain.Session(cfg(root, every_steps=10))
    job.register(session)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        assert session.restore() == 10
    assert any(expected.split(":")[0] in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    for k, v in snaps[10].items():
        assert torch.equal(job.model.state_dict()[k], v)


def test_stale_temp_dir_is_ignored_and_cleaned(tmp_path, capsys):
    root = tmp_path / "ckpt"
    run_to(root, 20)
    stale = root / layout.tmp_dirname(30, "deadbeef")
    stale.mkdir()
    (stale / "shard-00000.bin").write_bytes(b"\x00" * 1000)
    (root / "latest.partial").write_text("step-000000000030")
    assert cli(["ckpt", "verify", str(root)]) == 0
    assert "2 valid, 0 corrupt" in capsys.readouterr().out
    job = Job()
    session = ftrain.Session(cfg(root))
    job.register(session)
    assert session.restore() == 20
    assert not stale.exists() and not (root / "latest.partial").exists()


def test_latest_pointer_is_not_trusted(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 30)
    (root / layout.LATEST).write_text(layout.step_dirname(10) + "\n")  # stale pointer
    damage_flip_bin(root / layout.step_dirname(30))
    job = Job()
    session = ftrain.Session(cfg(root))
    job.register(session)
    assert session.restore() == 20


def test_nothing_valid_starts_fresh_or_errors_when_required(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    damage_missing_manifest(root / layout.step_dirname(10))
    job = Job()
    s = ftrain.Session(cfg(root))
    job.register(s)
    assert s.restore() == 0
    s = ftrain.Session(cfg(root, resume="required"))
    job.register(s)
    with pytest.raises(NoValidCheckpoint, match="no valid checkpoint"):
        s.restore()


def test_resume_never_refuses_a_dir_with_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    job = Job()
    s = ftrain.Session(cfg(root, resume="never"))
    job.register(s)
    assert s.restore() == 0  # empty: fine
    s.save(10, blocking=True)
    s = ftrain.Session(cfg(root, resume="never"))
    job.register(s)
    with pytest.raises(CheckpointDirError, match="already holds checkpoints"):
        s.restore()  # mixing a new run into an old run's directory would let retention delete the new one


def test_unwritable_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    s = ftrain.Session(cfg(blocker / "ckpt"))
    Job().register(s)
    with pytest.raises(CheckpointDirError, match=r"not writable.*checkpoint\.dir") as e:
        s.restore()
    assert e.value.exit_code == 2


def test_registered_state_must_match(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    job = Job()
    s = ftrain.Session(cfg(root))
    s.register(model=job.model, optimizer=job.opt)
    with pytest.raises(StateMismatch, match=r"missing: \['counters', 'scheduler'\]"):
        s.restore()


def test_register_rejects_non_stateful_and_reserved_names(tmp_path):
    s = ftrain.Session(cfg(tmp_path))
    with pytest.raises(ftrain.FtrainError, match="Counters"):
        s.register(step=5)
    with pytest.raises(ftrain.FtrainError, match="rng"):
        s.register(rng=ftrain.Counters())


def test_retention_keeps_last_k(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 50, keep_last=2)
    assert [p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name != "events"] == [layout.step_dirname(40), layout.step_dirname(50)]
    assert (root / layout.LATEST).read_text().strip() == layout.step_dirname(50)
    run_to(tmp_path / "all", 50, keep_last=0)
    assert len([p for p in (tmp_path / "all").iterdir() if p.is_dir() and p.name != "events"]) == 5


def test_every_seconds_triggers(tmp_path):
    job = Job()
    s = ftrain.Session(cfg(tmp_path, every_seconds=0.05))
    job.register(s)
    s.restore()
    assert not s.step(1)  # just restored: not due yet (0.05 s is far longer than this call)
    time.sleep(0.1)
    assert s.step(2)
    s.close()
    assert (tmp_path / layout.step_dirname(2)).is_dir()


def test_unstorable_state_fails_the_save_and_leaves_no_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    job, session, _ = run_to(root, 10)
    job.counters.bad = object()
    with pytest.raises(CheckpointError, match="counters/values/bad"):
        session.save(11)
    assert not (root / layout.step_dirname(11)).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    assert cli(["ckpt", "verify", str(root)]) == 0


def test_per_rank_choice_must_match(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    job = Job()
    s = ftrain.Session(cfg(root))
    s.register(model=job.model, optimizer=job.opt, scheduler=job.sched)
    s.register(counters=job.counters, per_rank=True)
    with pytest.raises(StateMismatch, match=r"per_rank changed: \['counters'\]"):
        s.restore()


def test_checkpoint_moved_aside_by_an_interrupted_replace_is_recovered(tmp_path):
    """A kill between 'move old step-N aside' and 'move new step-N in' must not lose step N."""
    root = tmp_path / "ckpt"
    run_to(root, 20)
    (root / layout.step_dirname(20)).rename(root / f".tmp-replaced-{layout.step_dirname(20)}-0123abcd")
    job = Job()
    s = ftrain.Session(cfg(root))
    job.register(s)
    assert s.restore() == 20
