"""Elastic recovery times on a simulated 2-node cluster, against a cold start of the same job in the same run.

    .venv/bin/python benchmarks/elastic.py [--repeat 2]

* cold start: both nodes started -> global rank 0 reports step 1 at 4 ranks (rendezvous of two agents,
  torchrun + imports of 4 workers, an empty restore);
* node loss: node B's whole process tree SIGKILLed -> the first step at 2 ranks on node A (A's workers see
  their peers vanish and fail, A's torchrun re-rendezvouses alone after ``last_call_timeout``, new workers
  import torch and restore the newest checkpoint: includes the steps recomputed since it);
* node rejoin: node B started again -> the first step at 4 ranks (B's imports, A's agent noticing a waiting
  node, A's graceful save on SIGTERM, the re-rendezvous, 4 workers' start and restore).

Each ratio is against the cold start measured in the same run: the floor a restart cannot beat without keeping
processes alive. The job is examples/train.py (global batch 64, checkpoint every 4 steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The simulated cluster is the multi-node tests' harness (tests/cluster.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cluster


def measure() -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="ftrain-elastic-"))
    store = cluster.Store()
    script = ["examples/train.py", "--steps", "100000", "--save-every", "4", "--print-every", "1", "--workers", "0",
              "--step-sleep", "0.02"]
    t0 = time.monotonic()
    a = cluster.node(store.endpoint, "bench", work / "ckpt", script)
    b = cluster.node(store.endpoint, "bench", work / "ckpt", script)
    nodes = [a, b]
    out: dict[str, float] = {}
    try:
        first = cluster.wait_until(lambda: cluster.first_step(nodes, 4, t0), "the first step at 4 ranks", nodes)
        out["cold start -> first step (4 ranks)"] = float(first) - t0  # type: ignore[arg-type]
        time.sleep(3)
        lost = time.monotonic()
        b.kill_tree()
        down = cluster.wait_until(lambda: cluster.first_step([a], 2, lost), "the first step at 2 ranks", [a])
        out["node loss -> first step (2 ranks)"] = float(down) - lost  # type: ignore[arg-type]
        time.sleep(3)
        back = time.monotonic()
        b = cluster.node(store.endpoint, "bench", work / "ckpt", script)
        nodes = [a, b]
        up = cluster.wait_until(lambda: cluster.first_step(nodes, 4, back), "the first step at 4 ranks again", nodes)
        out["node rejoin -> first step (4 ranks)"] = float(up) - back  # type: ignore[arg-type]
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill_tree()
        store.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    runs = [measure() for _ in range(args.repeat)]
    cold = statistics.median(r["cold start -> first step (4 ranks)"] for r in runs)
    print(f"{'measure':40s} {'median s':>9s} {'runs':>16s} {'x cold start':>13s}")
    for key in runs[0]:
        vals = [r[key] for r in runs]
        med = statistics.median(vals)
        print(f"{key:40s} {med:9.1f} {' '.join(f'{v:.1f}' for v in vals):>16s} {med / cold:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
