"""Hostile and unlucky checkpoints, made by the project's own API and then edited as an attacker would.

Each class fails safe: refused with a clear error, or fallen back to an older
checkpoint, and the registered objects are bit-identical to before whenever
restore raises. Real files; no processes (a FIFO needs none).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ftrain
from ftrain.checkpoint import checksum, retention
from ftrain.checkpoint import format as fmt
from ftrain.checkpoint.store import CheckpointStore
from ftrain.cli import main as cli
from ftrain.errors import CorruptCheckpoint, FtrainError, StateMismatch

from helpers import Job, cfg, job_state, reseal, reseal_file, run_job

run = run_job


def restore_into_fresh(root: Path, **kw: Any) -> tuple[Job, int]:
    """A fresh job restored from ``root``; returns it and the step restored."""
    job = Job()
    session = ftrain.Session(cfg(root, **kw))
    job.register(session)
    try:
        return job, session.restore()
    finally:
        session.close()


def step_dir(root: Path, step: int) -> Path:
    return root / fmt.step_dirname(step)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Checkpoints at steps 10 and 20 of the same run."""
    run(tmp_path / "ckpt", 20)
    return tmp_path / "ckpt"


# ------------------------------------------------------------- links and special files
def test_a_shard_linked_outside_the_root_is_never_read(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    shard = step_dir(root, 20) / fmt.shard_names(0)[1]
    shutil.copy(shard, outside)  # the same bytes: only the link itself is wrong
    shard.unlink()
    shard.symlink_to(outside)
    assert cli(["ckpt", "verify", str(root)]) == 1
    _, step = restore_into_fresh(root)
    assert step == 10
    # Restore set the damaged directory aside: it was saved here whole and its shard is not readable here.
    assert CheckpointStore(root).steps() == [10] and (root / fmt.quarantine_dirname(20) / shard.name).is_symlink()
    assert cli(["ckpt", "verify", str(root)]) == 0


def test_a_linked_step_directory_is_ignored_and_reported(root: Path, tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(step_dir(root, 20), elsewhere)
    (root / fmt.step_dirname(30)).symlink_to(elsewhere)  # a valid checkpoint, reached through a link
    _, step = restore_into_fresh(root)
    assert step == 20
    assert cli(["ckpt", "ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert "30" in out and "CORRUPT" in out and "symbolic link" in out


@pytest.mark.timeout(60)
def test_a_fifo_manifest_or_pointer_does_not_hang(root: Path, capsys) -> None:
    manifest = step_dir(root, 20) / fmt.MANIFEST
    manifest.unlink()
    os.mkfifo(manifest)
    (root / fmt.LATEST).unlink()
    os.mkfifo(root / fmt.LATEST)
    assert cli(["ckpt", "verify", str(root)]) == 1
    assert "FIFO" in capsys.readouterr().out
    assert cli(["ckpt", "ls", str(root)]) == 0
    _, step = restore_into_fresh(root)
    assert step == 10


@pytest.mark.timeout(60)
def test_links_to_dev_zero_are_refused(root: Path, capsys) -> None:
    (root / fmt.LATEST).unlink()
    (root / fmt.LATEST).symlink_to("/dev/zero")
    manifest = step_dir(root, 20) / fmt.MANIFEST
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    assert cli(["ckpt", "ls", str(root)]) == 0
    assert "symbolic link" in capsys.readouterr().out
    _, step = restore_into_fresh(root)
    assert step == 10


def test_a_planted_partial_link_is_not_written_through(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (root / f"{fmt.LATEST}{fmt.PARTIAL_SUFFIX}").symlink_to(victim)
    CheckpointStore(root).storage.write(fmt.LATEST, b"step-000000000020\n")
    assert victim.read_text() == "precious"


# ------------------------------------------------------------- sizes and allocation
def test_a_declared_huge_tensor_is_refused_before_anything_is_allocated(root: Path) -> None:
    """A sparse file and a resealed manifest (file checksum included) declaring one 2 GiB tensor."""
    d = step_dir(root, 20)
    bin_name = fmt.shard_names(0)[1]
    huge = 2 << 30
    offset = fmt.align_up((d / bin_name).stat().st_size)  # after every real tensor, as a careful forger would
    with open(d / bin_name, "r+b") as f:
        f.truncate(offset + huge)  # sparse: costs no disk
    with open(d / bin_name, "rb") as f:
        digest, blocks = checksum.stream_blocks(f)
    size = offset + huge

    def edit(body: dict[str, Any]) -> None:
        body["files"][bin_name].update(size=size, checksum=digest, blocks=blocks)
        body["tensors"]["replicated/model/weight"].update(offset=offset, nbytes=huge, shape=[huge // 16, 4],
                                                          dtype="float32")

    reseal(d / fmt.MANIFEST, edit)
    job = Job()
    before = job_state(job)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    session = ftrain.Session(cfg(root))
    job.register(session)
    with pytest.raises(StateMismatch, match=r"model.*weight is \[134217728, 4\] float32 in the checkpoint but \[3, 4\] float32"):
        session.restore()
    session.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10, "allocated the declared bytes"
    assert job_state(job) == before


def test_verify_work_is_bounded_by_the_files_present(root: Path, capsys) -> None:
    reseal(step_dir(root, 20) / fmt.MANIFEST, lambda body: body.update(world_size=1_000_000_000))
    assert cli(["ckpt", "verify", str(root)]) == 1
    assert "does not match world_size 1000000000" in capsys.readouterr().out


def test_an_oversized_manifest_is_refused_unread(root: Path) -> None:
    manifest = step_dir(root, 20) / fmt.MANIFEST
    with open(manifest, "ab") as f:
        f.truncate(fmt.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(CorruptCheckpoint, match="limit"):
        CheckpointStore(root).read_manifest(20)
    assert restore_into_fresh(root)[1] == 10


# ------------------------------------------------------------- ill-typed state: damage, fall back
def replicated_tree_edit(root: Path, step: int, edit: Any) -> None:
    """Edit rank 0's shard JSON (the replicated tree) and reseal it into the manifest."""
    d = step_dir(root, step)
    name = fmt.shard_names(0)[0]
    record = json.loads((d / name).read_bytes())
    edit(record["trees"])
    reseal_file(d, name, json.dumps(record).encode())


@pytest.mark.parametrize("damage", [
    pytest.param(lambda root: reseal(step_dir(root, 20) / fmt.MANIFEST,
                                     lambda b: b["meta"].update(replicated=5)), id="meta.replicated-a-number"),
    pytest.param(lambda root: reseal(step_dir(root, 20) / fmt.MANIFEST,
                                     lambda b: b["meta"].update(replicated=[["model"]])), id="meta.replicated-nested"),
    pytest.param(lambda root: replicated_tree_edit(root, 20, lambda t: t["replicated"].pop("scheduler")),
                 id="object-missing-from-tree"),
    pytest.param(lambda root: replicated_tree_edit(root, 20, lambda t: t["rank-00000"]["rng"].update(python=7)),
                 id="rng.python-a-number"),
    pytest.param(lambda root: replicated_tree_edit(
        root, 20, lambda t: t["replicated"]["model"].update(weight=3)), id="tensor-replaced-by-a-number"),
    pytest.param(lambda root: replicated_tree_edit(
        root, 20, lambda t: t["replicated"]["optimizer"].update(param_groups="x")), id="optimizer-groups-a-string"),
    pytest.param(lambda root: replicated_tree_edit(root, 20, lambda t: t.update(replicated=[1, 2])),
                 id="replicated-tree-a-list"),
])
def test_ill_typed_state_is_damage_and_restore_falls_back_untouched(root: Path, damage: Any) -> None:
    damage(root)
    job, step = restore_into_fresh(root)
    assert step == 10
    # The fallback loaded step 10 exactly: the same as a run restored from an undamaged copy of step 10.
    clean = root.parent / "clean"
    shutil.copytree(step_dir(root, 10), clean / fmt.step_dirname(10))
    ref_job, ref_step = restore_into_fresh(clean)
    assert ref_step == 10 and job_state(job) == job_state(ref_job)


def test_a_model_of_another_shape_is_a_clear_mismatch_and_nothing_is_loaded(root: Path) -> None:
    job = Job()
    job.model = torch.nn.Linear(4, 5)  # 5 outputs, the checkpoint has 3: bias and weight differ
    job.opt = torch.optim.AdamW(job.model.parameters(), lr=1e-2)
    job.sched = torch.optim.lr_scheduler.StepLR(job.opt, step_size=3, gamma=0.5)
    before = job_state(job)
    session = ftrain.Session(cfg(root))
    job.register(session)
    with pytest.raises(StateMismatch, match=r"model.*bias is \[3\] float32 in the checkpoint but \[5\] float32"):
        session.restore()
    session.close()
    assert job_state(job) == before


def test_a_mismatch_in_a_damaged_checkpoint_is_damage(root: Path) -> None:
    """A shape mismatch is only believed in a checkpoint that verifies; otherwise restore falls back."""
    d = step_dir(root, 20)
    reseal(d / fmt.MANIFEST, lambda b: b["tensors"]["replicated/model/bias"].update(shape=[1, 3]))
    bin_path = d / fmt.shard_names(0)[1]
    data = bytearray(bin_path.read_bytes())
    data[-1] ^= 0xFF  # and the bytes no longer match their checksum
    bin_path.write_bytes(bytes(data))
    assert restore_into_fresh(root)[1] == 10


def test_a_failing_load_state_dict_changes_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object whose own load_state_dict raises after the checks passed: every object is put back."""
    job = Job()
    job.train(3)
    before = job_state(job)
    session = ftrain.Session(cfg(root))
    job.register(session)

    def explode(self: object, state: dict[str, Any]) -> None:
        raise RuntimeError("scheduler refuses")

    # Loaded after the optimizer, which must then be undone too.
    monkeypatch.setattr(torch.optim.lr_scheduler.StepLR, "load_state_dict", explode)
    with pytest.raises(StateMismatch, match="scheduler refuses.*left as they were"):
        session.restore()
    session.close()
    assert job_state(job) == before


# ------------------------------------------------------------- retention
def test_retention_never_counts_checkpoints_that_do_not_validate(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    run(root, 30, keep_last=0)
    shutil.rmtree(step_dir(root, 30))
    for step in (40, 50, 60):  # damaged leftovers above the run's resume point
        shutil.copytree(step_dir(root, 20), step_dir(root, step))
        (step_dir(root, step) / fmt.MANIFEST).write_text("{garbage")
    run(root, 35, every=1, keep_last=2)  # resumes at 20, saves 21..35
    store = CheckpointStore(root)
    assert store.steps() == [34, 35] and all(store.intact(s) for s in (34, 35))
    # Passed over by the restore, the newer damaged ones were set aside, not deleted and never counted.
    assert [(q.step, q.name) for q in retention.quarantined(store)] == [
        (s, fmt.quarantine_dirname(s)) for s in (40, 50, 60)]


# ------------------------------------------------------------- save errors
def test_a_save_into_a_deleted_root_says_so(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    job = Job()
    session = ftrain.Session(cfg(root, every_steps=0, async_save=False))
    job.register(session)
    session.restore()
    session.save(1)
    shutil.rmtree(root)
    with pytest.raises(FtrainError) as err:
        session.save(2)
    session.close()
    message = str(err.value)
    assert "is gone" in message and "untouched" not in message


def test_export_refuses_a_declared_tensor_larger_than_memory(root: Path, tmp_path: Path, capsys) -> None:
    """The tools read whole objects: a resealed 1 TiB tensor over a sparse file is refused before allocating."""
    d = step_dir(root, 20)
    bin_name = fmt.shard_names(0)[1]
    offset = fmt.align_up((d / bin_name).stat().st_size)
    with open(d / bin_name, "r+b") as f:
        f.truncate(offset + (1 << 40))

    def edit(body: dict[str, Any]) -> None:
        body["files"][bin_name]["size"] = offset + (1 << 40)  # the checksums are never reached
        body["files"][bin_name]["blocks"] = ["0" * 32] * checksum.block_count(offset + (1 << 40))
        body["tensors"]["replicated/model/weight"].update(offset=offset, nbytes=1 << 40, shape=[1 << 38],
                                                          dtype="float32")

    reseal(d / fmt.MANIFEST, edit)
    assert cli(["ckpt", "export", str(root), str(tmp_path / "w.safetensors"), "--step", "20"]) == 1
    assert "memory available" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()
