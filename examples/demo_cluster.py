"""`make demo-cluster`: a 2-node elastic job loses a node, goes on with the other, takes it back, and every sample
is consumed exactly once, at the same global step as in an uninterrupted run.

1. ``ftrain rendezvous`` (the store, outside the nodes) and two nodes, each ``ftrain launch --nnodes 1:2
   --nproc 2 examples/train.py``: 4 ranks, a global batch of 64.
2. At a random step node B is SIGKILLed whole (supervisor, torchrun, workers). Node A's workers lose their
   peers; its torchrun re-rendezvouses alone and they resume from the newest checkpoint at 2 ranks, each rank
   taking twice the share (gradient accumulation). Node A's supervisor counts no crash.
3. Node B is started again: at the next rendezvous A's workers are stopped with SIGTERM (a graceful save) and
   the job continues at 4 ranks from that save.
4. The consumed-sample logs are audited against an uninterrupted single-process run of the same job.
"""
from __future__ import annotations

import random
import re
import sys
import tempfile
import time
from pathlib import Path

# The simulated cluster is the multi-node tests' harness (tests/cluster.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cluster

from ftrain.data import samplelog

STEPS = 64           # two epochs of 2048 samples in global batches of 64
STEPS_PER_EPOCH = 32
SHOW = re.compile(r"\[ftrain launch\]|restored step|world \d+:|finished|membership|rendezvous")


def say(msg: str) -> None:
    print(msg, flush=True)


def echo(name: str):  # type: ignore[no-untyped-def]
    def show(line: str) -> None:
        if SHOW.search(line) and "[rank " not in line:
            say(f"    {name}| {line.rstrip()}")
    return show


def step_of(procs: list[cluster.Process]) -> int:
    return max((int(m) for p in procs for m in re.findall(r"^step (\d+) ", p.output, re.M)), default=0)


def main() -> int:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ftrain-demo-cluster-"))
    script = ["examples/train.py", "--steps", str(STEPS), "--save-every", "4", "--print-every", "1",
              "--workers", "0", "--step-sleep", "0.1"]
    say(f"[demo-cluster] 1/4 reference: one process, the same job ({STEPS} steps, global batch 64)")
    ref = cluster.Process([sys.executable, *script, "--ckpt-dir", str(work / "ref"), "--index-log",
                           str(work / "ref-logs"), "--step-sleep", "0"], cluster.env())
    if ref.wait() != 0:
        say(f"[demo-cluster] FAILED: the reference run failed:\n{ref.output[-3000:]}")
        return 1

    store = cluster.Store()
    say(f"[demo-cluster] 2/4 store at {store.endpoint}; nodes A and B: ftrain launch --nnodes 1:2 --nproc 2")
    job = [*script, "--index-log", str(work / "logs")]
    a = cluster.node(store.endpoint, "demo-cluster", work / "ckpt", job, echo=echo("A"))
    b = cluster.node(store.endpoint, "demo-cluster", work / "ckpt", job, echo=echo("B"))
    nodes = [a, b]
    try:
        kill_at = random.randint(8, 14)
        cluster.wait_until(lambda: step_of(nodes) >= kill_at, f"step {kill_at}", nodes)
        say(f"    >>> demo: node B is reclaimed at step {step_of(nodes)}: SIGKILL to its whole process tree")
        lost = time.monotonic()
        b.kill_tree()
        banner = cluster.wait_until(lambda: a.first(r"^world 2:.*starting after step (\d+)", after=lost),
                                    "node A at world 2", [a])
        resumed = int(banner[1].group(1))  # type: ignore[index]
        cluster.wait_until(lambda: step_of([a]) > resumed, "a step at world 2", [a])
        say(f"    >>> demo: node A goes on alone at 2 ranks ({time.monotonic() - lost:.1f}s after the loss)")
        cluster.wait_until(lambda: step_of([a]) >= resumed + 4, "4 steps at world 2", [a])
        say(f"[demo-cluster] 3/4 node B comes back at step {step_of([a])}")
        back = time.monotonic()
        b = cluster.node(store.endpoint, "demo-cluster", work / "ckpt", job, echo=echo("B"))
        nodes = [a, b]
        cluster.wait_until(lambda: a.first(r"^world 4:", after=back) or b.first(r"^world 4:"), "world 4 again",
                           nodes)
        say(f"    >>> demo: the job is back at 4 ranks ({time.monotonic() - back:.1f}s after B started)")
        rcs = [a.wait(), b.wait()]
    finally:
        for p in nodes:
            if p.proc.poll() is None:
                p.kill_tree()
        store.stop()
    if rcs != [0, 0]:
        say(f"[demo-cluster] FAILED: the nodes exited with {rcs}")
        return 1

    say("[demo-cluster] 4/4 exactly-once audit of the consumed-sample logs against the reference")
    got, want = samplelog.history(work / "logs"), samplelog.history(work / "ref-logs")
    worlds = [g.world_size for g in samplelog.read(work / "logs")]
    problems = samplelog.audit(got, want, STEPS_PER_EPOCH, 2048)
    say(f"    process groups (world sizes, in order): {worlds}")
    say(f"    steps in the history that counts: {len(got)} of {STEPS}; samples per epoch: 2048")
    for p in problems:
        say(f"    PROBLEM: {p}")
    if problems or 2 not in worlds or worlds[-1] != 4:
        say("[demo-cluster] FAILED")
        return 1
    say(f"[demo-cluster] OK: every sample of both epochs consumed exactly once, each at the same global step as "
        f"in the uninterrupted run, through 4 -> 2 -> 4 ranks ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
