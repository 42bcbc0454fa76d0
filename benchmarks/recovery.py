"""Recovery times of the example job under `ftrain launch`, against a cold start measured in the same run.

    .venv/bin/python benchmarks/recovery.py [--nproc 4] [--repeat 2]

Each measurement is taken twice: with warm starts (the default: workers forked from the launch's zygote, which
imported torch once) and with `supervisor.warm_start: false` (every worker imports torch), so the ratios compare
with the cold-start job of the same run.

* cold start: `ftrain launch` started -> rank 0 reports step 1;
* SIGKILL recovery: a rank SIGKILLed -> the restarted job reports its first step
  after the restore (torchrun's failure detection, stopping the survivors, its
  re-rendezvous, the workers' start (forked or imports), the restore);
* hang: a rank SIGSTOPped -> the restarted job reports its first step, less
  ``supervisor.hang_timeout_seconds`` (3 s here): detection's lateness, the stack
  dump, teardown and the restart;
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
HANG_TIMEOUT = 3.0  # supervisor.hang_timeout_seconds for the hang measurement


class Job:
    def __init__(self, ckpt: Path, nproc: int, warm: bool, *, launcher: list[str] | None = None) -> None:
        """``ftrain launch`` of the example job, or with ``launcher`` the same job under another launcher
        (torchrun's command line: an anchor that restarts its workers inside a live agent; the Session restores)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               "FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "0", "FTRAIN_SUPERVISOR_WARM_START": "1" if warm else "0",
               "FTRAIN_SUPERVISOR_HANG_TIMEOUT_SECONDS": str(HANG_TIMEOUT),
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # without it torchrun's restarts failed or hung here
        script = ["examples/train.py", "--steps", "100000", "--print-every", "1", "--step-sleep", "0.005",
                  "--ckpt-dir", str(ckpt), "--save-every", "10"]
        cmd = ([*launcher, "--nproc-per-node", str(nproc), "--max-restarts", "5", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", *script] if launcher is not None else
               [sys.executable, "-m", "ftrain", "launch", "--nproc", str(nproc), "--ckpt-dir", str(ckpt),
                "--max-restarts", "5", *script])
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


def rank_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    """The ranks' real worker processes: children of the zygote when warm (torchrun's children are their thin
    entries; torchrun itself is the zygote's child too, told apart by its entries), else torchrun's children."""
    try:
        for child in supervisor.children():
            if "ftrain.supervisor.zygote" in " ".join(child.cmdline()):
                return [w for w in child.children()
                        if not any("ftrain.supervisor.entry" in " ".join(c.cmdline()) for c in w.children())]
        return [w for c in supervisor.children() if "torch.distributed.run" in " ".join(c.cmdline())
                for w in c.children()]
    except psutil.Error:
        return []  # the job is between attempts: nothing to kill now


def measure(nproc: int, warm: bool) -> dict[str, float]:
    ckpt = Path(tempfile.mkdtemp(prefix="ftrain-recovery-"))
    job = Job(ckpt, nproc, warm)
    t_first, _ = job.until(r"^step 1 ")
    out = {"cold start -> first step": t_first - job.t0}
    job.until(r"^step 25 ")
    victim = rank_processes(psutil.Process(job.proc.pid))[-1]
    t_kill, wall_kill = time.monotonic(), time.time()
    victim.kill()
    job.until(r"restored step \d+")
    t_back, _ = job.until(r"^step \d+ ")
    out["SIGKILL -> first resumed step"] = t_back - t_kill
    job.until(r"^step 45 ")
    victim = rank_processes(psutil.Process(job.proc.pid))[-1]
    t_stop = time.monotonic()
    victim.suspend()  # SIGSTOP: a hang, as a deadlock would be (its stacks cannot be dumped either)
    job.until(r"restored step \d+")
    t_back, _ = job.until(r"^step \d+ ")
    out["hang -> first resumed step, less the timeout"] = t_back - t_stop - HANG_TIMEOUT
    job.until(r"^step 70 ")
    t_term = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    t_commit, _ = job.until(r"preempted .*checkpoint of step \d+ committed")
    out["SIGTERM -> checkpoint committed"] = t_commit - t_term
    job.proc.wait()
    out["SIGTERM -> supervisor exited"] = time.monotonic() - t_term
    out.update(breakdown(ckpt, wall_kill))
    return out


def anchor_ranks(launcher: psutil.Process) -> list[psutil.Process]:
    """The rank processes under another launcher: the script's processes whose parent is not one (DataLoader
    workers are), skipping the launcher's own helpers (NVRx forks its store host and rank monitors)."""
    def runs_script(p: psutil.Process) -> bool:
        cmd = " ".join(p.cmdline())
        return "train.py" in cmd and not any(x in cmd for x in ("ft_launcher", "torch.distributed.run"))
    try:
        return [p for p in launcher.children(recursive=True) if runs_script(p) and not runs_script(p.parent())]
    except psutil.Error:
        return []


def measure_anchor(nproc: int, launcher: list[str]) -> dict[str, float]:
    """The same job's cold start and SIGKILL recovery under another launcher."""
    job = Job(Path(tempfile.mkdtemp(prefix="ftrain-recovery-")), nproc, False, launcher=launcher)
    try:
        t_first, _ = job.until(r"^step 1 ")
        out = {"cold start -> first step": t_first - job.t0}
        job.until(r"^step 25 ")
        victim = anchor_ranks(psutil.Process(job.proc.pid))[-1]
        t_kill = time.monotonic()
        victim.kill()
        job.until(r"restored step \d+")
        t_back, _ = job.until(r"^step \d+ ")
        out["SIGKILL -> first resumed step"] = t_back - t_kill
        return out
    finally:
        for p in psutil.Process(job.proc.pid).children(recursive=True):
            p.kill()
        job.proc.kill()
        job.proc.wait()


def breakdown(ckpt: Path, kill: float) -> dict[str, float]:
    """Where the SIGKILL's recovery went, from the run's event log (docs/FORMAT.md, "Event log"; wall clock)."""
    from ftrain.events import read_events

    events = [e for e in read_events(ckpt) if e["t"] >= kill or e["ev"] == "session_start"]

    def first(ev: str, after: float, key: str = "t") -> float:
        return min(float(e[key]) for e in events if e["ev"] == ev and float(e[key]) >= after)

    judged = first("group_end", kill)  # the supervisor classified the killed group's end (not on the restart's path)
    worker = first("session_start", kill, "proc_start")  # rank 0's new process (forked, or a fresh python)
    restore = next(e for e in events if e["ev"] == "restore" and e["t"] >= worker)
    step = first("first_step", restore["t"])
    return {"  kill -> the supervisor judged the group's end": judged - kill,
            "  kill -> rank 0's new process (torchrun: detection, stop, rendezvous, start)": worker - kill,
            "  rank 0 process -> restore begins": float(restore["start"]) - worker,
            "  restore": float(restore["seconds"]), "  restore -> first step done": step - float(restore["t"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--anchors", type=Path, help="a bin directory with NVRx's ft_launcher (`make anchors`: "
                   ".venv-anchors/bin): also measure the job under it")
    args = p.parse_args()
    launchers = {"torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    if args.anchors is not None:
        launchers["ft_launcher"] = [str(args.anchors / "ft_launcher")]
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    anchors: dict[str, list[dict[str, float]]] = {name: [] for name in launchers}
    for _ in range(args.repeat):  # interleaved, so every mode sees the same machine load
        for warm in (False, True):
            runs[warm].append(measure(args.nproc, warm))
        for name, launcher in launchers.items():
            anchors[name].append(measure_anchor(args.nproc, launcher))
    cold = statistics.median(r["cold start -> first step"] for r in runs[False])
    print(f"example job, ftrain launch --nproc {args.nproc}, median of {args.repeat}; ratios against the cold "
          f"start with warm starts off ({cold:.2f} s); other launchers (--max-restarts 5) of the same job beside")
    print(f"{'what':<48} {'warm s':>7} {'ratio':>6} {'cold s':>7} {'ratio':>6}"
          + "".join(f" {name + ' s':>14} {'ratio':>6}" for name in launchers))
    for key in runs[True][0]:
        w = statistics.median(r[key] for r in runs[True])
        c = statistics.median(r[key] for r in runs[False])
        line = f"{key:<48} {w:>7.2f} {w / cold:>5.2f}x {c:>7.2f} {c / cold:>5.2f}x"
        for name in launchers:
            if key in anchors[name][0]:
                a = statistics.median(r[key] for r in anchors[name])
                line += f" {a:>14.2f} {a / cold:>5.2f}x"
        print(line)


if __name__ == "__main__":
    main()
