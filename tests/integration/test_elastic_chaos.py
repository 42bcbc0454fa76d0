"""Chaos on a simulated 2-node cluster running an FSDP2 model: a node SIGKILLed whole inside a save, the survivor
going on at 2 ranks, the node rejoining at 4, then a random node SIGKILLed whole at a random step and the survivor
finishing at 2; every sample consumed exactly once, at the same global step as in an uninterrupted run (from
examples/train.py's consumed-sample logs), and no survivor counting a crash. `ftrain status` and `ftrain goodput`
tell the truth about it (issue 22): every node's launch and heartbeats, a lane per node, no preemption.

Nodes are `ftrain launch --nnodes 1:2 --nproc 2` processes over an `ftrain rendezvous` store on 127.0.0.1
(tests/cluster.py).
"""
from __future__ import annotations

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

from ftrain.data import samplelog
from ftrain.telemetry.live import read_status

from helpers import EXAMPLE, Background, assert_no_orphans, child_env, processes_mentioning

pytestmark = pytest.mark.slow

STEPS = 64  # two whole epochs, each audited for exactly-once
STEPS_PER_EPOCH = 32  # 2048 samples in global batches of 64
SAVE_EVERY = 4
#: Seconds each step sleeps: a rejoining node needs ~10 s (imports, torchrun) before it waits at the rendezvous,
#: and the survivor must still be training then.
PACE = "0.4"


def printed_step(procs: list[cluster.Process]) -> int:
    return max((int(m) for p in procs for m in re.findall(r"^step (\d+) ", p.output, re.M)), default=0)


def test_nodes_killed_whole_then_rejoining_consume_every_sample_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alongside: Callable[[Background], Background]) -> None:
    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # The model is the example's transformer sharded by FSDP2: each resize reshards its parameters and AdamW
    # state (every rank reads its new shards' byte ranges from the old ranks' files). The plain DDP model's
    # resizes are test_resize.py's.
    script = [str(EXAMPLE), "--fsdp", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--print-every",
              "1", "--workers", "0"]

    # The first loss: the node of a random rank dies whole in the middle of writing its shard of a save.
    save_step, rank = rng.choice([8, 12]), rng.randrange(4)
    once = tmp_path / "once"
    once.mkdir()
    env = cluster.env(FTRAIN_FAULTS=f"killnode@save.mid_write:step={save_step}:rank={rank}",
                      FTRAIN_FAULTS_ONCE_DIR=str(once))
    job = [*script, "--step-sleep", PACE, "--index-log", str(tmp_path / "logs")]
    ckpt = tmp_path / "ckpt"
    run_id = f"chaos-{seed}"
    store = cluster.Store()
    nodes = [cluster.node(store.endpoint, run_id, ckpt, job, environ=env) for _ in range(2)]
    info = f"seed {seed}, killnode at the save of step {save_step} on rank {rank}"
    try:
        dead = cluster.wait_until(lambda: [n for n in nodes if n.proc.poll() is not None], "the node to die", nodes)
        assert len(dead) == 1, info  # type: ignore[arg-type]
        survivor = next(n for n in nodes if n.proc.poll() is None)
        down = time.monotonic()
        cluster.wait_until(lambda: survivor.first(r"^world 2:", after=down), "the survivor at 2 ranks", [survivor])
        nodes = [survivor, cluster.node(store.endpoint, run_id, ckpt, job, environ=env)]  # the node comes back at once
        back = time.monotonic()
        cluster.wait_until(lambda: any(n.first(r"^world 4:", after=back) for n in nodes), "4 ranks again", nodes)
        # ftrain status: the job, not one node: both running nodes' ranks, and the first one lost.
        st = wait_for_ranks([ckpt], 4, 2)
        assert node_states(st) == ["lost", "running", "running"], st.nodes
        # The uninterrupted run, in the background from here: the cluster's steps are paced, so until the job
        # ends it mostly sleeps (started earlier, it would slow the nodes' CPU-bound starts instead).
        ref = alongside(Background([sys.executable, *script, "--ckpt-dir", str(tmp_path / "ref"), "--index-log",
                                    str(tmp_path / "ref-logs")], child_env()))
        # The second loss: a random node, a few steps later (random), killed from outside; no rejoin this time.
        kill_at = printed_step(nodes) + rng.randint(2, 6)
        assert kill_at < STEPS - 4, f"{info}: the rejoin came too late to test a second loss (step {kill_at})"
        cluster.wait_until(lambda: printed_step(nodes) >= kill_at, f"step {kill_at}", nodes)
        victim = rng.randrange(2)
        nodes[victim].kill_tree()
        survivor = nodes[1 - victim]
        rc = survivor.wait(timeout=300)
        assert rc == 0, f"{info}, second kill at step {kill_at}: {rc}\n{survivor.output[-4000:]}"
        # Both losses and the rejoin were membership changes to the survivors' supervisors, never failures.
        for n in nodes:
            assert "local failure" not in n.output, n.output[-4000:]
        assert "membership change" in survivor.output, survivor.output[-4000:]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill_tree()
        store.stop()
    assert len(list(once.iterdir())) == 1, "the in-save node kill must have fired"
    assert_no_orphans(run_id)
    assert not processes_mentioning(str(ckpt))

    tl, events = check_goodput([ckpt], capsys)
    assert len(tl.lanes) == 3, info  # two nodes, the first back as a third launch
    assert any(e["ev"] == "preempted" for e in events), "torchrun's stop at the rejoin: the workers saved"
    assert tl.counts["preemptions"] == 0 and tl.counts["membership"] >= 3, (info, tl.counts)
    first = next(lane for lane in tl.lanes if lane.node.endswith(f"/{dead[0].proc.pid}"))  # type: ignore[index]
    assert first.buckets["productive"] > 0, f"{info}: the node killed first trained before it died"
    lost = [lane.node for lane in tl.lanes if any(m.text == "node lost" for m in lane.marks)]
    assert sorted(lost) == sorted(lane.node for lane in tl.lanes if not lane.node.endswith(f"/{survivor.proc.pid}"))
    assert node_states(read_status(ckpt)) == ["exited 0", "lost", "lost"]

    done = ref.result()
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = samplelog.history(tmp_path / "logs"), samplelog.history(tmp_path / "ref-logs")
    assert samplelog.audit(got, want, STEPS_PER_EPOCH, 2048) == [], info
    worlds = [g.world_size for g in samplelog.read(tmp_path / "logs")]
    assert worlds == [4, 2, 4, 2], (info, worlds)
