"""Spot nodes with disks of their own: every node's checkpoint directory is private (a mount namespace per node
with its own directory bind-mounted at the same path, as a Kubernetes emptyDir or a VM's local NVMe), and a
lost node's disk is wiped before it comes back.

* replicas, no remote tier (``--nnodes 2:2``): a node dies whole inside a save, rejoins on an empty disk; later
  the other node is killed at a random step and rejoins empty too. The job ends bit-identical to an
  uninterrupted run, and every restart resumes from the newest step committed before the loss;
* the remote tier (moto), no replicas (``--nnodes 1:2``): a node is lost, the survivor goes on alone with the
  lost node's files from the remote tier, the node rejoins empty, another is lost; every sample is consumed
  exactly once, at the same global step as in an uninterrupted run;
* both, with the surviving node's replica of the lost node's files damaged: the restore falls through to the
  remote tier's copy, and the job still ends bit-identical.

`ftrain status` and `ftrain goodput` over every node's disk are the job's (issue 22): what the disks still hold
(a wiped disk takes its node's event log with it).
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cluster
import pytest
from job_views import check_goodput, node_states, wait_for_ranks
from remote_servers import s3_server

from ftrain.checkpoint import format
from ftrain.checkpoint.store import CheckpointStore, open_store
from ftrain.cli import main as cli
from ftrain.data import samplelog
from ftrain.telemetry.live import Status, read_status

from helpers import DDP4_JOB, EXAMPLE, Background, Reference, assert_no_orphans, child_env, final_hash

pytestmark = pytest.mark.slow
if (why := cluster.can_have_private_disks()) is not None:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"no private disks per node here: {why}")]

STEPS = 32
SAVE_EVERY = 4
#: Seconds each step sleeps, so a node that rejoins (~10 s of imports and rendezvous) still finds a job running.
PACE = "0.25"


def job(steps: int = STEPS, *extra: str) -> list[str]:
    return [str(EXAMPLE), "--steps", str(steps), "--save-every", str(SAVE_EVERY), "--print-every", "1", "--workers",
            "0", "--step-sleep", PACE, *extra]


#: ddp4_reference's job (STEPS steps, a save every SAVE_EVERY), paced.
SCRIPT = [str(EXAMPLE), *DDP4_JOB, "--step-sleep", PACE]


@pytest.fixture
def reference(ddp4_reference: Reference) -> str:
    """The uninterrupted run's final state at 4 ranks on one node (one shared directory; shared with other
    modules: conftest.py)."""
    return final_hash(ddp4_reference.run.stdout)


class Cluster:
    """Nodes of one job, each with a private disk at the same path; the store outside every node."""

    def __init__(self, tmp: Path, run_id: str, nnodes: str, env: dict[str, str], script: list[str]) -> None:
        self.tmp, self.run_id, self.nnodes, self.env, self.script = tmp, run_id, nnodes, env, script
        self.ckpt = tmp / "ckpt"  # the same path on every node; each sees its own disk there
        self.disks = [tmp / "disk-a", tmp / "disk-b"]
        self.store = cluster.Store()
        self.nodes = [self.start(i) for i in range(2)]
        self.gone: list[cluster.Process] = []

    def start(self, i: int) -> cluster.Process:
        return cluster.node(self.store.endpoint, self.run_id, self.ckpt, self.script, nnodes=self.nnodes,
                            environ=self.env, disk=self.disks[i])

    def lines(self) -> list[tuple[float, str]]:
        return sorted(line for p in [*self.gone, *self.nodes] for line in list(p.lines))

    def step(self) -> int:
        return max((int(m.group(1)) for _, line in self.lines() if (m := re.match(r"^step (\d+) ", line))), default=0)

    def committed(self, before: float) -> int:
        """The newest step rank 0 reported committed before ``before`` (0: none)."""
        return max((int(m.group(1)) for t, line in self.lines()
                    if t < before and (m := re.search(r"INFO saved step (\d+) ", line))), default=0)

    def uploaded(self, url: str, before: float | None = None) -> int:
        """The newest step rank 0 reported committed on the remote tier (before ``before``; 0: none)."""
        return max((int(m.group(1)) for t, line in self.lines() if (before is None or t < before)
                    and (m := re.search(rf"INFO uploaded step (\d+) to {re.escape(url)}", line))), default=0)

    def resumed_after(self, after: float) -> int:
        """The step the job restarted from, after ``after``."""
        found = cluster.wait_until(lambda: next((int(m.group(1)) for t, line in self.lines() if t > after and (
            m := re.search(r"^world \d+: .* starting after step (\d+)", line))), None), "a restart", self.nodes)
        return int(found)  # type: ignore[call-overload]

    def lose(self, i: int, *, back: bool = True) -> float:
        """Node ``i`` is gone whole with its disk (killed from outside if still alive); with ``back``, it comes
        back at once on an empty disk (else :meth:`rejoin` brings it back)."""
        if self.nodes[i].proc.poll() is None:
            self.nodes[i].kill_tree()
        lost = time.monotonic()
        cluster.wipe(self.disks[i])
        if back:
            self.rejoin(i)
        return lost

    def rejoin(self, i: int) -> None:
        self.gone.append(self.nodes[i])
        self.nodes[i] = self.start(i)

    def world(self, size: int, after: float) -> None:
        cluster.wait_until(lambda: any(n.first(rf"^world {size}:", after=after) for n in self.nodes),
                           f"{size} ranks", self.nodes)

    def fresh_starts(self) -> int:
        """How many worker groups started at step 0 once a checkpoint had been committed (rank 0 says so once per
        group; before the first commit, a group the nodes' first rendezvous split may start at 0 twice)."""
        lines = self.lines()
        first = next((t for t, line in lines if re.search(r"INFO saved step \d+ ", line)), None)
        return sum(1 for t, line in lines if first is not None and t > first
                   and re.match(r"^world \d+: .* starting after step 0$", line))

    def finish(self) -> list[int]:
        return [n.wait(timeout=300) for n in self.nodes if n not in self.gone]

    def output(self) -> str:
        return "\n=====\n".join(p.output[-4000:] for p in [*self.gone, *self.nodes])

    def close(self) -> None:
        for n in self.nodes:
            if n.proc.poll() is None:
                n.kill_tree()
        self.store.stop()


def private_env(**extra: str) -> dict[str, str]:
    return cluster.env(FTRAIN_CHECKPOINT_REPLICAS="1", **extra)


def verify_disks(c: Cluster) -> None:
    """Each disk's part of every checkpoint left validates (``ftrain ckpt verify`` reads it as a node would)."""
    for disk in c.disks:
        assert cli(["ckpt", "verify", str(disk)]) == 0, disk


def test_nodes_lost_with_their_disks_rejoin_empty_and_end_bit_exact(tmp_path: Path, reference: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    save_step, rank = rng.choice([8, 12]), rng.randrange(4)
    once = tmp_path / "once"
    once.mkdir()
    env = private_env(FTRAIN_FAULTS=f"killnode@save.mid_write:step={save_step}:rank={rank}",
                      FTRAIN_FAULTS_ONCE_DIR=str(once))
    c = Cluster(tmp_path, f"nl-a-{seed}", "2:2", env, SCRIPT)
    info = f"seed {seed}: killnode inside the save of step {save_step} on rank {rank}"
    try:
        dead = cluster.wait_until(lambda: [i for i, n in enumerate(c.nodes) if n.proc.poll() is not None],
                                  "the node to die", c.nodes)
        assert len(dead) == 1, info  # type: ignore[arg-type]
        lost = c.lose(dead[0])  # type: ignore[index]
        assert c.committed(lost) == save_step - SAVE_EVERY, info  # the save it died in never committed
        assert c.resumed_after(lost) == save_step - SAVE_EVERY, f"{info}\n{c.output()}"
        # ftrain status over both disks: both nodes' ranks, each node's heartbeats read from its own disk.
        wait_for_ranks(c.disks, 4, 2)
        # The second loss: a random node at a random step, from outside; it comes back empty too.
        kill_at = c.step() + rng.randint(3, 6)
        cluster.wait_until(lambda: c.step() >= kill_at, f"step {kill_at}", c.nodes)
        lost = c.lose(rng.randrange(2))
        assert c.resumed_after(lost) == c.committed(lost), f"{info}, second loss at step {kill_at}\n{c.output()}"
        assert c.finish() == [0, 0], f"{info}\n{c.output()}"
    finally:
        c.close()
    assert len(list(once.iterdir())) == 1, "the in-save node kill must have fired"
    assert "fetched" in c.output() and c.fresh_starts() == 0, c.output()
    assert final_hash(c.output()) == reference, f"{info}: the final state differs from the uninterrupted run's"
    verify_disks(c)
    assert_no_orphans(c.run_id)
    tl, _ = check_goodput(c.disks, capsys)  # one lane per node launch whose disk was not wiped since
    assert len(tl.lanes) == 2 and tl.counts["attempts"] >= 1
    assert len(check_goodput(c.disks[:1], capsys)[0].lanes) == 1
    assert node_states(cli_status(c.disks)) == ["exited 0", "exited 0"]


def cli_status(dirs: list[Path]) -> Status:
    assert cli(["status", *map(str, dirs)]) == 0
    return read_status(*dirs)


STEPS_PER_EPOCH = 32  # 2048 samples in global batches of 64


def test_remote_tier_alone_carries_a_lost_disk_through_resizes_exactly_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alongside: Callable[[Background], Background]) -> None:
    """No replicas: the survivor gets the lost node's files from the remote tier (what was uploaded before the
    loss), at half the world size; the node rejoins empty; then a node is lost again."""
    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    steps = 40
    script = job(steps, "--index-log", str(tmp_path / "logs"))
    with s3_server() as s3:
        url = f"s3://{s3.make_bucket()}/run"
        env = cluster.env(**s3.env(), FTRAIN_CHECKPOINT_REMOTE_URL=url, FTRAIN_CHECKPOINT_REPLICAS="0")
        c = Cluster(tmp_path, f"nl-b-{seed}", "1:2", env, script)
        info = f"seed {seed}"
        try:
            cluster.wait_until(lambda: c.uploaded(url) >= 8, "an upload", c.nodes)
            # The uninterrupted run, in the background from here: the cluster's steps are paced, so until the job
            # ends it mostly sleeps (started earlier, it would slow the nodes' CPU-bound starts instead).
            ref = alongside(Background([sys.executable, str(EXAMPLE), "--steps", str(steps), "--workers", "0",
                                        "--ckpt-dir", str(tmp_path / "ref"), "--index-log", str(tmp_path / "ref-logs"),
                                        "--print-every", "0"], child_env()))
            for loss in range(2):  # lost; the survivor alone; the node back on an empty disk; lost again, for good
                kill_at = c.step() + rng.randint(1, 5)
                cluster.wait_until(lambda at=kill_at: c.step() >= at, f"step {kill_at}", c.nodes)
                victim = rng.randrange(2)
                lost = c.lose(victim, back=False)
                c.nodes[victim].proc.wait()
                uploaded, committed = c.uploaded(url, before=lost), c.committed(lost)
                resumed = c.resumed_after(lost)
                assert uploaded <= resumed <= committed, f"{info}: resumed at {resumed}, uploaded {uploaded}, " \
                                                         f"committed {committed}\n{c.output()}"
                c.world(2, lost)
                if loss == 0:
                    back = time.monotonic()
                    c.rejoin(victim)
                    c.world(4, back)
                else:
                    c.gone.append(c.nodes[victim])
            assert c.finish() == [0], f"{info}\n{c.output()}"
        finally:
            c.close()
    assert c.fresh_starts() == 0, c.output()  # never over a checkpoint
    check_goodput(c.disks, capsys)  # no preemption: torchrun's stop when the node came back is a membership change
    done = ref.result()
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = samplelog.history(tmp_path / "logs"), samplelog.history(tmp_path / "ref-logs")
    assert samplelog.audit(got, want, STEPS_PER_EPOCH, 2048) == [], info
    worlds = [g.world_size for g in samplelog.read(tmp_path / "logs")]
    assert worlds == [4, 2, 4, 2], (info, worlds)
    assert_no_orphans(c.run_id)


def test_a_damaged_replica_falls_through_to_the_remote_tier_bit_exact(tmp_path: Path, reference: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    with s3_server() as s3:
        url = f"s3://{s3.make_bucket()}/run"
        for k, v in s3.env().items():  # this process lists the remote tier too
            monkeypatch.setenv(k, v)
        c = Cluster(tmp_path, f"nl-c-{seed}", "2:2", private_env(**s3.env(), FTRAIN_CHECKPOINT_REMOTE_URL=url),
                    SCRIPT)
        try:
            cluster.wait_until(lambda: c.uploaded(url) >= 12, "step 12 uploaded", c.nodes)
            victim = rng.randrange(2)
            lost = c.lose(victim)  # the survivor's workers stop; its disk is quiet until the victim is back
            survivor = c.disks[1 - victim]
            on_remote = set(open_store(url).steps())
            # Damage the survivor's copy of the lost node's files in every step it holds from the newest one that
            # is also remote on: that one must come from the remote tier, none newer can be assembled.
            target = max(s for s in CheckpointStore(survivor).steps() if s in on_remote)
            damaged = [damage_replica(survivor, s) for s in CheckpointStore(survivor).steps() if s >= target]
            assert c.resumed_after(lost) == target, f"seed {seed}: damaged {damaged}\n{c.output()}"
            assert c.finish() == [0, 0], c.output()
        finally:
            c.close()
    out = c.output()
    assert c.fresh_starts() == 0, out
    assert re.search(rf"fetched \d+ file\(s\) of checkpoint step {target} from .*{re.escape(url)}", out), out
    assert final_hash(out) == reference, f"seed {seed}: the final state differs from the uninterrupted run's"
    verify_disks(c)
    assert_no_orphans(c.run_id)


def damage_replica(disk: Path, step: int) -> str:
    """Flip a byte in the middle of a .bin this disk holds only as another disk's replica; its name."""
    d = disk / format.step_dirname(step)
    body = json.loads((d / format.MANIFEST).read_text())["body"]
    mine = set(body["placement"][(disk / format.DISK_ID).read_text().strip()])
    name = next(n for n, f in sorted(body["files"].items()) if n.endswith(".bin") and f["rank"] not in mine)
    with open(d / name, "r+b") as f:
        f.seek(body["files"][name]["size"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    return f"{format.step_dirname(step)}/{name}"
