"""Node-local checkpoint directories on a simulated 2-node cluster, against a shared directory and a cold start of
the same job, all in one run.

    .venv/bin/python benchmarks/nodelocal.py [--mib 16] [--seconds 30] [--repeat 2]

Two ``ftrain launch --nnodes 1:2 --nproc 2`` nodes on this host (tests/cluster.py); with node-local disks each
node sees its own directory at the checkpoint path (a mount namespace per node) and a lost node's disk is
wiped before it comes back. The job (``--worker`` below) is a DDP model of ``--mib`` MiB of parameters plus
AdamW (three times that in state), a checkpoint every 3 s. Per layout:

* cold start: both nodes started -> the first step at 4 ranks (the floor every ratio is against);
* throughput: steps per second over ``--seconds`` of training with checkpoints (rank 0's step times);
* node loss: node B's tree SIGKILLed, its disk wiped -> the first step at 2 ranks on node A: the survivor's
  restore needs B's files: on the shared directory they are there, with replicas they are on A's disk already,
  with the remote tier alone they are downloaded;
* rejoin on an empty disk: B started again -> the first step at 4 ranks: B's ranks read files that are on A's
  disk (fetched from the peer) or in the bucket (downloaded), or on the shared directory.

Layouts: ``shared`` (one directory), ``local`` (node-local, no replicas, no remote: the baseline that replication
costs against; throughput only, since nothing survives a node's loss there), ``replicas`` (node-local,
``checkpoint.replicas: 1``), ``remote`` (node-local, the remote tier on a moto S3 server in this process, no
replicas).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tests/: the simulated cluster (cluster.py, the multi-node tests' harness) and the S3 server (remote_servers.py).
sys.path.insert(0, str(ROOT / "tests"))

import cluster  # noqa: E402

SAVE_SECONDS = "3"


def worker(mib: int) -> int:
    """One rank of the benchmark job: DDP over a square Linear of ``mib`` MiB, random batches seeded by step."""
    import torch
    import torch.distributed as dist

    import ftrain

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dim = int((mib * (1 << 20) / 4) ** 0.5)
    model = torch.nn.Linear(dim, dim)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    session = ftrain.Session()
    session.register(model=model, optimizer=opt)
    step = session.restore()
    rank = dist.get_rank()
    if rank == 0:
        print(f"world {dist.get_world_size()}: starting after step {step}", flush=True)
    while True:
        g = torch.Generator().manual_seed(step)
        ddp(torch.randn(16, dim, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            print(f"step {step} at {time.monotonic():.3f}", flush=True)
        session.step(step)


def steps_between(nodes: list[cluster.Process], t0: float, t1: float) -> int:
    return sum(1 for n in nodes for t, line in list(n.lines) if t0 <= t < t1 and re.match(r"^step \d+ ", line))


def measure(layout: str, mib: int, seconds: float, s3: object | None) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"ftrain-nodelocal-{layout}-"))
    extra = {"FTRAIN_CHECKPOINT_EVERY_SECONDS": SAVE_SECONDS, "FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST": "2",
             "FTRAIN_CHECKPOINT_REPLICAS": "1" if layout == "replicas" else "0"}
    if layout == "remote":
        extra.update(s3.env(through_proxy=False), FTRAIN_CHECKPOINT_REMOTE_URL=f"s3://{s3.make_bucket()}/run")  # type: ignore[union-attr]
    env = cluster.env(**extra)
    script = [__file__, "--worker", "--mib", str(mib)]
    disks = [work / "disk-a", work / "disk-b"] if layout != "shared" else [None, None]
    store = cluster.Store()

    def start(i: int) -> cluster.Process:
        return cluster.node(store.endpoint, f"bench-{layout}", work / "ckpt", script, environ=env, disk=disks[i])

    t0 = time.monotonic()
    a, b = start(0), start(1)
    nodes = [a, b]
    out: dict[str, float] = {}
    try:
        first = cluster.wait_until(lambda: cluster.first_step(nodes, 4, t0), "the first step at 4 ranks", nodes, 300)
        out["cold start"] = float(first) - t0  # type: ignore[arg-type]
        time.sleep(5)
        t1 = time.monotonic()
        time.sleep(seconds)
        out["steps/s"] = steps_between(nodes, t1, t1 + seconds) / seconds
        if layout == "local":  # nothing survives a node's loss here (ftrain refuses to start over): throughput only
            return out
        lost = time.monotonic()
        b.kill_tree()
        if disks[1] is not None:
            cluster.wipe(disks[1])
        down = cluster.wait_until(lambda: cluster.first_step([a], 2, lost), "the first step at 2 ranks", [a], 300)
        out["node loss"] = float(down) - lost  # type: ignore[arg-type]
        time.sleep(4)
        back = time.monotonic()
        b = start(1)
        nodes = [a, b]
        up = cluster.wait_until(lambda: cluster.first_step(nodes, 4, back), "the first step at 4 ranks again", nodes,
                                300)
        out["rejoin (empty disk)"] = float(up) - back  # type: ignore[arg-type]
        text = "".join(n.output for n in nodes)
        fetched = re.findall(r"fetched (\d+) file\(s\) of checkpoint step \d+ from (.*) in ([\d.]+)s", text)
        out["fetch s"] = sum(float(f[2]) for f in fetched)
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill_tree()
        store.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mib", type=int, default=16, help="MiB of parameters (the state is 3x: AdamW's two moments)")
    p.add_argument("--seconds", type=float, default=30, help="seconds of training measured for throughput")
    p.add_argument("--layouts", nargs="*", default=["shared", "local", "replicas", "remote"])
    p.add_argument("--repeat", type=int, default=2, help="rounds over the layouts (each number is a median)")
    args = p.parse_args()
    if args.worker:
        return worker(args.mib)
    if (why := cluster.can_have_private_disks()) is not None:
        print(f"node-local disks cannot be simulated here: {why}")
        return 1
    from remote_servers import s3_server

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with s3_server() as s3:
        rounds = [{layout: measure(layout, args.mib, args.seconds, s3) for layout in args.layouts}
                  for _ in range(args.repeat)]
    runs = {layout: {key: statistics.median(r[layout][key] for r in rounds) for key in rounds[0][layout]}
            for layout in args.layouts}
    for layout in args.layouts:
        print(f"{layout}: steps/s per round {[round(r[layout]['steps/s'], 2) for r in rounds]}")
    cold = statistics.median(r["cold start"] for r in runs.values())
    base = runs.get("local", runs.get("shared", next(iter(runs.values()))))["steps/s"]
    print(f"state {3 * args.mib} MiB (parameters {args.mib} MiB + AdamW), a checkpoint every {SAVE_SECONDS} s, "
          f"2 nodes x 2 ranks, median of {args.repeat} rounds; cold start (median of the layouts) {cold:.1f} s")
    print(f"{'layout':10s} {'cold s':>7s} {'steps/s':>8s} {'x local':>8s} {'loss s':>7s} {'x cold':>7s} "
          f"{'rejoin s':>9s} {'x cold':>7s} {'fetched s':>10s}")
    for layout, r in runs.items():
        recovery = (f"{r['node loss']:7.1f} {r['node loss'] / cold:7.2f} {r['rejoin (empty disk)']:9.1f} "
                    f"{r['rejoin (empty disk)'] / cold:7.2f} {r['fetch s']:10.2f}" if "node loss" in r else
                    f"{'-':>7s} {'-':>7s} {'-':>9s} {'-':>7s} {'-':>10s}")
        print(f"{layout:10s} {r['cold start']:7.1f} {r['steps/s']:8.2f} {r['steps/s'] / base:8.3f} {recovery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
