"""``ftrain ckpt verify`` and ``ls`` against restore, on real checkpoints damaged on disk (issue 22).

Verify runs restore's checks of a checkpoint's own content (``checkpoint/content.py``, ``manifest.check_meta``), so
each hostile edit below, resealed the way an attacker who knows the format would, is CORRUPT to verify (exit 1)
and refused by restore (which falls back, then quarantines it). ``--quarantine`` sets aside what it finds
damaged as a whole, under the root's lease; ``ls`` shows what was set aside. An empty remote prefix lists like an
empty directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import ftrain
from ftrain.checkpoint import format as fmt
from ftrain.checkpoint import retention
from ftrain.checkpoint.lease import for_writer
from ftrain.checkpoint.store import CheckpointStore
from ftrain.cli import main as cli

from helpers import Job, cfg, reseal, reseal_file, run_job

run = run_job


def restored_step(root: Path) -> int:
    job = Job()
    session = ftrain.Session(cfg(root))
    job.register(session)
    try:
        return session.restore()
    finally:
        session.close()


def step_dir(root: Path, step: int) -> Path:
    return root / fmt.step_dirname(step)


def verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli(["ckpt", "verify", *argv])
    return code, capsys.readouterr().out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Checkpoints at steps 10 and 20 of one run."""
    run(tmp_path / "ckpt", 20)
    return tmp_path / "ckpt"


def meta(**fields: Any) -> Any:
    return lambda root: reseal(step_dir(root, 20) / fmt.MANIFEST, lambda body: body["meta"].update(fields))


def tree(edit: Any, rank_tree: bool = False) -> Any:
    """Edit rank 0's shard record (its replicated tree, or its own with ``rank_tree``) and reseal it."""
    def damage(root: Path) -> None:
        d, name = step_dir(root, 20), fmt.shard_names(0)[0]
        record = json.loads((d / name).read_bytes())
        edit(record["trees"][fmt.rank_key(0) if rank_tree else fmt.REPLICATED])
        reseal_file(d, name, json.dumps(record).encode())
    return damage


#: (damage, what verify's reason says). Each is refused by restore for the checkpoint's own content.
CONTENT_DAMAGE = [
    pytest.param(meta(replicated=5), "meta.replicated is not a list of names", id="meta.replicated-5"),
    pytest.param(meta(replicated=[[1]]), "meta.replicated is not a list of names", id="meta.replicated-nested"),
    pytest.param(meta(frozen="x"), "meta.frozen is malformed", id="meta.frozen-x"),
    pytest.param(meta(per_rank={"a": 1}), "meta.per_rank is not a list of names", id="meta.per_rank-object"),
    pytest.param(meta(omitted={"model": ["weight"]}), "omits parameters it does not record as frozen",
                 id="meta.omitted-not-frozen"),
    pytest.param(tree(lambda t: t.pop("scheduler")), "lists 'scheduler' but its state tree is missing",
                 id="object-missing-from-tree"),
    pytest.param(tree(lambda t: t.update(counters=[1, 2])), "the state of 'counters' is a list", id="state-a-list"),
    pytest.param(tree(lambda t: t["rng"].update(python=7), rank_tree=True), "Python 'random' state is malformed",
                 id="rng.python-a-number"),
    pytest.param(tree(lambda t: t.pop("rng"), rank_tree=True), "RNG state: missing", id="rng-missing"),
]


@pytest.mark.parametrize(("damage", "reason"), CONTENT_DAMAGE)
def test_verify_calls_corrupt_what_restore_refuses_for_its_own_content(
        root: Path, damage: Any, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    damage(root)
    code, out = verify(capsys, str(root))
    assert code == 1, out
    [line] = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert line.startswith(f"CORRUPT  step 20  {step_dir(root, 20)}/") and reason in line
    assert out.splitlines()[-1] == "1 valid, 1 corrupt"
    code, out = verify(capsys, str(root), "20")
    assert code == 1 and reason in out
    # Restore refuses the same files: it falls back to step 10, and sets step 20 aside as damaged.
    assert restored_step(root) == 10
    assert [q.name for q in retention.quarantined(CheckpointStore(root))] == [fmt.quarantine_dirname(20)]
    assert verify(capsys, str(root))[0] == 0


def test_state_that_only_the_registered_objects_refuse_is_not_quarantined(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tensor replaced by a number fits no Linear, but verify cannot know what is registered: the checkpoint's
    own content is consistent, so verify says ok, and restore falls back without setting it aside."""
    tree(lambda t: t["model"].update(weight=3))(root)
    assert verify(capsys, str(root))[0] == 0
    assert restored_step(root) == 10
    assert CheckpointStore(root).steps() == [10, 20] and retention.quarantined(CheckpointStore(root)) == []


def test_verify_quarantine_sets_aside_what_it_finds_and_ls_shows_it(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta(replicated=5)(root)
    code, out = verify(capsys, str(root), "--quarantine")
    assert code == 1 and f"quarantined as {fmt.quarantine_dirname(20)}" in out
    store = CheckpointStore(root)
    assert store.steps() == [10] and not (root / fmt.LEASE_RECORD).exists()  # the lease was released
    [q] = retention.quarantined(store)
    assert q.step == 20 and "ftrain ckpt verify: manifest.json: manifest meta.replicated" in q.note
    assert verify(capsys, str(root))[0] == 0  # what is left verifies
    assert cli(["ckpt", "ls", str(root)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[0] == "10" and rows[1].endswith("valid")
    assert rows[2].split()[0] == "20" and f"QUARANTINED as {fmt.quarantine_dirname(20)}: " in rows[2]
    assert "meta.replicated is not a list of names" in rows[2]
    assert cli(["ckpt", "ls", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in doc["checkpoints"]] == [10]
    assert [(r["step"], r["status"], r["name"]) for r in doc["quarantined"]] == [
        (20, "quarantined", fmt.quarantine_dirname(20))]


def test_verify_quarantine_is_refused_while_a_job_holds_the_root(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta(frozen="x")(root)
    lease = for_writer(root, ttl=30, force=False, run_id=None, launcher=None)  # what a training job holds
    try:
        assert cli(["ckpt", "verify", str(root), "--quarantine"]) == 2
        assert "lease" in capsys.readouterr().err
        assert step_dir(root, 20).is_dir() and retention.quarantined(CheckpointStore(root)) == []
    finally:
        lease.release()


def test_a_part_of_a_checkpoint_saved_to_several_disks_is_never_quarantined(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Step 20 as one disk's part of a two-disk checkpoint: its own file truncated is a damaged copy (a replica
    elsewhere may repair it), not a damaged checkpoint: verify reports it and leaves it in place."""
    store = CheckpointStore(root)
    other = "b" * 32

    def two_disks(body: dict[str, Any]) -> None:
        files = body["files"]
        for name in fmt.shard_names(0):
            files[name.replace("00000", "00001")] = dict(files[name], rank=1)
        body.update(world_size=2, placement={store.disk: [0], other: [1]})

    reseal(step_dir(root, 20) / fmt.MANIFEST, two_disks)
    assert store.info(20).valid and store.info(20).part == "ranks 0 of 2 here"
    with open(step_dir(root, 20) / fmt.shard_names(0)[1], "r+b") as f:
        f.truncate(8)
    code, out = verify(capsys, str(root), "--quarantine")
    assert code == 1 and "CORRUPT  step 20" in out and "left in place: not damaged as a whole here" in out
    assert store.steps() == [10, 20] and retention.quarantined(store) == []


@pytest.mark.timeout(120)
def test_ls_an_empty_remote_prefix_like_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           request: pytest.FixtureRequest) -> None:
    pytest.importorskip("moto")
    remote = request.getfixturevalue("remote")  # a fresh bucket; the prefix holds nothing
    assert cli(["ckpt", "ls", remote]) == 0
    assert capsys.readouterr().out == f"no checkpoints in {remote}\n"
    assert cli(["ckpt", "ls", str(tmp_path)]) == 0  # the same as an empty local directory
    assert capsys.readouterr().out == f"no checkpoints in {tmp_path}\n"
    assert cli(["ckpt", "verify", remote]) == 1  # nothing to verify is still a failure for verify, as locally
    capsys.readouterr()
    assert cli(["ckpt", "ls", "s3://ftrain-no-such-bucket/runs/exp"]) == 2  # a missing bucket is a mistake
    assert "does not exist" in capsys.readouterr().err
