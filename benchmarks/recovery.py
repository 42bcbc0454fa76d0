"""Recovery times of the example job under `ftrain launch`, against a cold start measured in the same run.

    .venv/bin/python benchmarks/recovery.py [--nproc 4] [--repeat 2]

* cold start: `ftrain launch` started -> rank 0 reports step 1;
* SIGKILL recovery: a rank SIGKILLed -> the restarted job reports its first step
  after the restore (includes failure detection, teardown, backoff of 0 s,
  torchrun + imports, rendezvous, restore);
* SIGTERM to committed checkpoint: SIGTERM to the supervisor -> rank 0 logs the
  preemption checkpoint as committed; and -> the supervisor has exited.

Times are taken from output lines as they arrive (torchrun's tee polls every
0.1 s, which bounds the resolution).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class Job:
    def __init__(self, ckpt: Path, nproc: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               "FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "0"}
        cmd = [sys.executable, "-m", "ftrain", "launch", "--nproc", str(nproc), "--ckpt-dir", str(ckpt),
               "--save-every-steps", "10", "--max-restarts", "5", "examples/train.py", "--steps", "100000",
               "--print-every", "1", "--step-sleep", "0.005"]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def until(self, pattern: str) -> tuple[float, re.Match[str]]:
        rx = re.compile(pattern)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = rx.search(line)
            if m:
                return time.monotonic(), m
        raise RuntimeError(f"job ended before {pattern!r}")


def measure(nproc: int) -> dict[str, float]:
    ckpt = Path(tempfile.mkdtemp(prefix="ftrain-recovery-"))
    job = Job(ckpt, nproc)
    t_first, _ = job.until(r"^step 1 ")
    out = {"cold start -> first step": t_first - job.t0}
    job.until(r"^step 25 ")
    torchrun = psutil.Process(job.proc.pid).children()[0]
    victim = torchrun.children()[-1]
    t_kill = time.monotonic()
    victim.kill()
    job.until(r"restored step \d+")
    t_back, _ = job.until(r"^step \d+ ")
    out["SIGKILL -> first resumed step"] = t_back - t_kill
    job.until(r"^step 45 ")
    t_term = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    t_commit, _ = job.until(r"preempted .*checkpoint of step \d+ committed")
    out["SIGTERM -> checkpoint committed"] = t_commit - t_term
    job.proc.wait()
    out["SIGTERM -> supervisor exited"] = time.monotonic() - t_term
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    runs = [measure(args.nproc) for _ in range(args.repeat)]
    cold = statistics.median(r["cold start -> first step"] for r in runs)
    print(f"example job, ftrain launch --nproc {args.nproc}, median of {args.repeat}")
    print(f"{'what':<34} {'seconds':>8} {'vs cold start':>14}")
    for key in runs[0]:
        value = statistics.median(r[key] for r in runs)
        print(f"{key:<34} {value:>8.2f} {value / cold:>13.2f}x")


if __name__ == "__main__":
    main()
