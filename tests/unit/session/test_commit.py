"""The commit of one checkpoint across disks (session/commit.py), with ranks as threads over one in-memory store:
node-local and shared directories, replicas, a rank that fails, a rank that never reports, a disk that may not
commit; and what the tools and a restore make of one disk's part."""
from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain import faults
from ftrain.checkpoint import codec, format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.snapshot import StagingArena, take_snapshot
from ftrain.checkpoint.store import CheckpointStore, open_store
from ftrain.cli import main as cli
from ftrain.config import CheckpointConfig, RemoteConfig
from ftrain.errors import CheckpointError, IncompleteCheckpoints, LeaseError
from ftrain.session import rng
from ftrain.session.commit import SaveProtocol
from ftrain.session.exchange import LocalExchange
from ftrain.session.layout import Layout
from ftrain.session.replicas import SAFE_KEY
from ftrain.session.tiers import RemoteTier

from helpers import cfg

A, B = "a" * 32, "b" * 32
NONCE = "00000000000abc"


class CopyingReplicas:
    """Stands in for ``replicas.Replicas`` (which needs a gloo group): copies this disk's files to the next disk's
    directory; ``fail`` makes it report that a received file did not arrive intact."""

    def __init__(self, job: Job, layout: Layout) -> None:
        self.job, self.layout, self.rounds = job, layout, [[]]
        self.calls: list[int] = []

    def copy(self, step: int, manifest: Manifest) -> list[str]:
        self.calls.append(step)
        order = self.layout.order
        me = order.index(self.layout.my_disk)
        src, dst = self.job.stores[order[me]].root, self.job.stores[order[(me + 1) % len(order)]].root
        for name in manifest.primary_files(self.layout.my_disk):
            shutil.copy(src / format.step_dirname(step) / name, dst / format.step_dirname(step) / name)
        return ["shard-00002.bin"] if self.job.fail_replicas else []


class Job:
    """W ranks as threads, each with the protocol over its disk's root; disk ids from ``disks``."""

    def __init__(self, tmp: Path, disks: list[str], *, timeout: float = 5.0,
                 guard: Callable[[int, int], None] = lambda rank, step: None, replicas: bool = False) -> None:
        self.x = LocalExchange()
        self.stores = {d: CheckpointStore(tmp / d[:4]) for d in set(disks)}
        for d, s in self.stores.items():
            s.ensure_writable()
            (s.root / format.DISK_ID).write_text(f"{d}\n")  # what disks.disk_id() leaves in a root
        self.after: list[tuple[int, int]] = []
        self.fail_replicas = False
        self.replicas: dict[int, CopyingReplicas] = {}
        self.protocols = []
        for r, d in enumerate(disks):
            layout = Layout(r, tuple(disks))
            reps = CopyingReplicas(self, layout) if replicas and layout.is_leader else None
            if reps is not None:
                self.replicas[r] = reps
            self.protocols.append(SaveProtocol(layout, self.x, self.stores[d], timeout=timeout,
                                               guard=lambda step, r=r: guard(r, step),
                                               replicas=reps))  # type: ignore[arg-type]

    def save(self, step: int, ranks: list[int] | None = None) -> dict[int, BaseException | Manifest | None]:
        out: dict[int, BaseException | Manifest | None] = {}

        def one(rank: int) -> None:
            p = self.protocols[rank]
            # Every per-rank tree holds an RNG state, as a Session's does (verify checks it, like restore).
            own, tensors = codec.encode({"w": torch.full((3,), float(rank)), "rng": rng.capture()}, rank_key(rank))
            trees = {rank_key(rank): own}
            if rank == 0:
                trees[REPLICATED] = {}
            snap = take_snapshot(trees, tensors, rank=rank, step=step, nonce=NONCE, arena=StagingArena())
            tmp = format.tmp_dirname(step, NONCE)
            p.store.storage.makedir(tmp)
            try:
                out[rank] = p.run(snap, p.begin(step), tmp, {"replicated": []}, time.monotonic(), lambda: 0.0,
                                  after=lambda s, _m: self.after.append((rank, s)))
            except BaseException as e:
                out[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in (ranks if ranks is not None
                                                                       else range(len(self.protocols)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out


def shard_files(root: Path, step: int) -> list[str]:
    d = root / format.step_dirname(step)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_node_local_disks_each_commit_their_own_ranks_and_the_same_manifest(tmp_path: Path) -> None:
    job = Job(tmp_path, [A, A, B, B])
    out = job.save(4)
    assert not [e for e in out.values() if isinstance(e, BaseException)], out
    assert isinstance(out[0], Manifest) and isinstance(out[2], Manifest) and out[1] is None and out[3] is None
    a, b = job.stores[A].root, job.stores[B].root
    assert shard_files(a, 4) == sorted(["manifest.json", *format.shard_names(0), *format.shard_names(1)])
    assert shard_files(b, 4) == sorted(["manifest.json", *format.shard_names(2), *format.shard_names(3)])
    manifest_a = (a / format.step_dirname(4) / format.MANIFEST).read_bytes()
    assert manifest_a == (b / format.step_dirname(4) / format.MANIFEST).read_bytes()
    assert json.loads(manifest_a)["body"]["placement"] == {A: [0, 1], B: [2, 3]}
    for store in job.stores.values():  # each disk's part validates; it says which ranks it holds
        assert store.validate(4).step == 4 and store.latest_hint() == format.step_dirname(4)
        assert store.info(4).valid and "of 4 here" in store.info(4).part
    assert sorted(job.after) == [(0, 4), (2, 4)]  # the leaders, after the job committed
    assert not [p for p in a.iterdir() if p.name.startswith(".tmp")]
    assert len(job.x) <= 8  # the records were deleted once read


def test_the_tools_read_a_node_local_disk_as_a_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = Job(tmp_path, [A, A, B, B])
    job.save(4)
    a = str(job.stores[A].root)
    assert cli(["ckpt", "ls", a]) == 0
    assert "valid (ranks 0-1 of 4 here; the rest on other nodes' disks)" in capsys.readouterr().out
    assert cli(["ckpt", "verify", a]) == 0
    assert "ok       step 4" in capsys.readouterr().out
    out = tmp_path / "model.safetensors"
    assert cli(["ckpt", "export", a, str(out), "--step", "4", "--object", "rank-00000"]) == 1
    err = capsys.readouterr().err
    assert "holds only part of checkpoint step 4 (ranks 0-1 of 4 here)" in err and "remote tier" in err
    assert not out.exists()
    # Its own ranks' files are what it must hold: one missing is damage, not "elsewhere".
    (job.stores[A].root / format.step_dirname(4) / format.shard_names(1)[1]).unlink()
    assert cli(["ckpt", "verify", a]) == 1
    assert "shard-00001.bin: file listed in the manifest is missing" in capsys.readouterr().out


def test_replicas_are_part_of_the_commit_and_make_it_safe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = Job(tmp_path, [A, A, B, B], replicas=True)
    assert not [e for e in job.save(4).values() if isinstance(e, BaseException)]
    every = sorted(["manifest.json", *[n for r in range(4) for n in format.shard_names(r)]])
    assert shard_files(job.stores[A].root, 4) == every == shard_files(job.stores[B].root, 4)
    assert job.replicas[0].calls == [4] == job.replicas[2].calls and job.x.get(SAFE_KEY) == b"4"
    # Replicas that do not arrive intact: the step still commits, but is not safe (the newest safe one stays 4).
    job.fail_replicas = True
    assert not [e for e in job.save(8).values() if isinstance(e, BaseException)]
    assert all(s.steps() == [4, 8] for s in job.stores.values()) and job.x.get(SAFE_KEY) == b"4"
    assert "checkpoint step 8 is committed but not safe against a node's loss" in caplog.text


def test_the_same_step_saved_again_at_once_uses_its_own_keys(tmp_path: Path) -> None:
    """A final save right after a scheduled one of the same step (with new metrics): the second must not read the
    first's records or counters (seen as "rank 1's shard record is unreadable")."""
    job = Job(tmp_path, [A, A, B, B])
    for _ in range(3):
        assert not [e for e in job.save(4).values() if isinstance(e, BaseException)]
    assert all(s.steps() == [4] and s.validate(4) for s in job.stores.values())


def test_one_shared_directory_holds_every_file(tmp_path: Path) -> None:
    job = Job(tmp_path, [A, A, A])
    assert all(not isinstance(v, BaseException) for v in job.save(2).values())
    root = job.stores[A].root
    assert shard_files(root, 2) == sorted(["manifest.json", *[n for r in range(3) for n in format.shard_names(r)]])
    assert job.stores[A].info(2).part == "" and job.after == [(0, 2)]


def test_a_failed_shard_fails_the_save_everywhere_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job(tmp_path, [A, A, B, B], timeout=60)
    job.save(4)
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("raise@save.mid_write:step=8:rank=3"))
    t0 = time.monotonic()
    out = job.save(8)
    assert time.monotonic() - t0 < 10, "nobody waits out the commit timeout"
    assert isinstance(out[0], CheckpointError) and "rank 3 failed to write its shard of step 8" in str(out[0])
    assert isinstance(out[2], CheckpointError) and "injected fault" in str(out[2])  # B's leader heard the abort
    for store in job.stores.values():  # nothing of step 8 anywhere; step 4 untouched; no temp directory left
        assert store.steps() == [4] and store.latest_hint() == format.step_dirname(4)
        assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]


def test_a_rank_that_never_reports_is_named(tmp_path: Path) -> None:
    job = Job(tmp_path, [A, A, B, B], timeout=0.5)
    out = job.save(4, ranks=[0, 1, 3])  # rank 2 (B's leader) died before it wrote anything
    err = out[0]
    assert isinstance(err, CheckpointError) and "rank(s) 2 on disk bbbbbbbb (ranks 2-3)" in str(err)
    assert "did not report a durable shard within 0s" in str(err) or "within 1s" in str(err)
    assert job.stores[A].steps() == [] and job.stores[B].steps() == []


def test_a_disk_that_may_not_commit_withdraws_the_step_everywhere(tmp_path: Path) -> None:
    def guard(rank: int, step: int) -> None:
        if rank == 2 and step == 8:
            raise LeaseError("lost the lease of B")

    job = Job(tmp_path, [A, A, B, B], guard=guard)
    job.save(4)
    out = job.save(8)
    assert isinstance(out[2], LeaseError)
    assert isinstance(out[0], CheckpointError) and "lost the lease of B" in str(out[0])
    for store in job.stores.values():
        assert store.steps() == [4], store.root  # A renamed its part of 8, then withdrew it


def test_a_restore_never_starts_fresh_over_a_part_whose_rest_is_on_another_disk(tmp_path: Path) -> None:
    """Disk B (ranks 2-3) is gone with no replica and no remote tier: what disk A holds cannot be assembled, and
    starting at step 0 would throw it away. The restore refuses, says what each source holds and how to start
    over on purpose, and changes nothing."""
    job = Job(tmp_path, [A, A, B, B])
    job.save(4)
    job.save(8)
    session = ftrain.Session(cfg(job.stores[A].root))
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session.register(model=model)
    with pytest.raises(IncompleteCheckpoints) as e:
        session.restore()
    msg = str(e.value)
    assert "parts of step(s) 4, 8 were written to node-local disks that are not in the job now" in msg
    assert "step 8: ranks 0-1 of 4; step 4: ranks 0-1 of 4" in msg and "delete the step-* directories" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert job.stores[A].steps() == [4, 8]
    session.close()


def test_each_disk_uploads_its_own_files_and_rank_0_the_manifest_once_all_are_remote(tmp_path: Path,
                                                                                     remote: str) -> None:
    job = Job(tmp_path, [A, A, B, B])
    job.save(4)
    job.save(8)
    tiers = {}
    for rank, disk in ((0, A), (2, B)):
        tier = RemoteTier(CheckpointConfig(dir=str(job.stores[disk].root), remote=RemoteConfig(url=remote, retries=1),
                                           commit_timeout_seconds=30), job.stores[disk])
        tier.start(Layout(rank, (A, A, B, B)), job.x, lambda step: None)
        tiers[rank] = tier
    for tier in tiers.values():
        tier.committed(4, [])
    assert tiers[0].wait(4, 60) is not None
    target = open_store(remote)
    assert target.steps() == [4] and target.validate(4, whole=True).placement == {A: (0, 1), B: (2, 3)}
    manifest = (job.stores[A].root / format.step_dirname(4) / format.MANIFEST).read_bytes()
    assert target.storage.read(f"{format.step_dirname(4)}/{format.MANIFEST}", 1 << 20) == manifest
    # Disk B cannot send its part of step 8 (a file vanished): rank 0 learns it at once, never publishes step 8.
    (job.stores[B].root / format.step_dirname(8) / format.shard_names(3)[1]).unlink()
    t0 = time.monotonic()
    for tier in tiers.values():
        tier.committed(8, [])
    assert tiers[0].wait(8, 60) is None and time.monotonic() - t0 < 20
    assert [m.step for m in target.candidates()] == [4]  # no remote manifest of step 8
    assert "disk bbbbbbbb (ranks 2-3)" in (tiers[0].uploader.last_error or "")  # type: ignore[union-attr]
    for tier in tiers.values():
        tier.close(10)
