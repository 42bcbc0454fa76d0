"""Goodput of the example job under repeated kills, from its own event log, against floors measured here.

    .venv/bin/python benchmarks/goodput.py [--minutes 10] [--kill-every 60] [--sweep-minutes 4] [--parts sigkill]

Three parts:

1. **SIGTERM**: ``ftrain launch`` gets SIGTERM every ``--kill-every`` seconds (a preemption: final save,
   exit 75) and the same command is relaunched at once, for ``--minutes``;
2. **SIGKILL**: one ``ftrain launch``; a random worker rank is SIGKILLed every ``--kill-every`` seconds (the
   supervisor restarts the job from the newest checkpoint), for ``--minutes``;
3. **advisor check**: the SIGKILL run's ``ftrain goodput`` recommends ``checkpoint.every_seconds``; the SIGKILL
   run is repeated for ``--sweep-minutes`` at a third of it, at it, and at three times it, and the measured
   goodputs are compared.

Goodput and its buckets come from ``ftrain goodput --json`` on each run's checkpoint directory. The floors,
measured in the same run: a worker's bare cold start (a Python process importing torch and building an AdamW,
what any training process pays: the AdamW makes torch import its compiler) and torchrun's (importing
``torch.distributed.run``); a cold restart pays both in sequence, so with cold restarts a kill every N seconds
leaves at most ``1 - (torchrun + worker) / N`` goodput. Warm starts (the default) pay neither: above 1.00x that
ceiling is what they buy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from recovery import rank_processes  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
       "FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "0", "FTRAIN_SUPERVISOR_MAX_RESTARTS": "1000",
       "FTRAIN_SUPERVISOR_MAX_ATTEMPTS_WITHOUT_PROGRESS": "0", "FTRAIN_SUPERVISOR_PROGRESS_SECONDS": "0"}
STEP_SLEEP = "0.03"  # a step of ~50 ms: the example's model alone is too small to look like training


def command(ckpt: Path, nproc: int, every: float) -> list[str]:
    return [sys.executable, "-m", "ftrain", "launch", "--nproc", str(nproc), "--ckpt-dir", str(ckpt),
            "--save-every-seconds", f"{every:g}", "examples/train.py", "--steps", "10000000", "--print-every", "0",
            "--step-sleep", STEP_SLEEP]


def start(ckpt: Path, nproc: int, every: float, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(command(ckpt, nproc, every), cwd=ROOT, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def goodput(ckpt: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "ftrain", "goodput", str(ckpt), "--json"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def sigterm_run(work: Path, minutes: float, every_kill: float, nproc: int, every: float) -> dict:
    ckpt = work / "sigterm"
    end = time.monotonic() + minutes * 60
    codes = []
    while time.monotonic() < end:
        proc = start(ckpt, nproc, every, work / "sigterm.log")
        time.sleep(min(every_kill, max(1.0, end - time.monotonic())))
        codes.append(stop(proc))
    print(f"  {len(codes)} launches, exit codes {sorted(set(codes))}", flush=True)
    return goodput(ckpt)


def sigkill_run(ckpt: Path, log: Path, minutes: float, every_kill: float, nproc: int, every: float) -> dict:
    proc = start(ckpt, nproc, every, log)
    t0 = time.monotonic()
    end = t0 + minutes * 60
    kills = 0
    next_kill = t0 + every_kill
    while time.monotonic() < end:
        time.sleep(max(0.0, min(next_kill, end) - time.monotonic()))
        if time.monotonic() >= end:
            break
        ranks = rank_processes(psutil.Process(proc.pid))  # the real workers, warm or cold
        if ranks:
            random.choice(ranks).send_signal(signal.SIGKILL)
            kills += 1
        next_kill += every_kill
    rc = stop(proc)
    print(f"  {kills} worker(s) SIGKILLed, then SIGTERM: exit {rc}", flush=True)
    return goodput(ckpt)


def cold_start_floor(code: str, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def show(name: str, g: dict, ceiling: float) -> None:
    b, wall = g["buckets"], g["wall_seconds"]
    parts = ", ".join(f"{k} {v / wall:.1%}" for k, v in b.items() if v > 0 and k != "productive")
    print(f"{name}: goodput {g['goodput']:.3f} over {wall / 60:.1f} min ({g['counts']['attempts']} attempts); "
          f"{g['goodput'] / ceiling:.2f}x the cold-restart ceiling {ceiling:.3f}", flush=True)
    print(f"  badput: {parts}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=60.0)
    p.add_argument("--sweep-minutes", type=float, default=4.0, help="0: skip the advisor check")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--every-seconds", type=float, default=5.0, help="checkpoint.every_seconds of parts 1 and 2")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--parts", default="sigterm,sigkill", help="which of sigterm,sigkill to run (the advisor check "
                   "follows sigkill unless --sweep-minutes 0)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftrain-goodput-"))
    worker = cold_start_floor("import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])")
    torchrun = cold_start_floor("import torch.distributed.run")
    restart_floor = worker + torchrun
    ceiling = 1 - restart_floor / args.kill_every
    print(f"floors: a worker's cold start (import torch, build AdamW) {worker:.2f} s, torchrun's (import) "
          f"{torchrun:.2f} s; a cold restart pays both, {restart_floor:.2f} s: with cold restarts a kill every "
          f"{args.kill_every:g} s leaves at most {ceiling:.3f} goodput (warm starts pay neither)", flush=True)
    results: dict = {"floor_worker_s": worker, "floor_torchrun_s": torchrun, "ceiling": ceiling}
    parts = set(args.parts.split(","))
    measured = []
    if "sigterm" in parts:
        print(f"1/3 SIGTERM to ftrain launch every {args.kill_every:g} s, relaunched, for {args.minutes:g} min",
              flush=True)
        results["sigterm"] = term = sigterm_run(work, args.minutes, args.kill_every, args.nproc, args.every_seconds)
        show("SIGTERM", term, ceiling)
        measured.append(f"SIGTERM {term['goodput']:.3f}")
    if "sigkill" not in parts:
        print(f"goodput: {', '.join(measured)} (target >= 0.95)")
        return
    print(f"2/3 SIGKILL of a random rank every {args.kill_every:g} s, for {args.minutes:g} min", flush=True)
    results["sigkill"] = kill = sigkill_run(work / "sigkill", work / "sigkill.log", args.minutes, args.kill_every,
                                            args.nproc, args.every_seconds)
    show("SIGKILL", kill, ceiling)
    measured.append(f"SIGKILL {kill['goodput']:.3f}")
    advice = kill["advisor"]
    if isinstance(advice, str) or args.sweep_minutes <= 0:
        print(f"advisor: {advice}")
    else:
        best = advice["daly"]
        print(f"3/3 advisor: every_seconds {best:.2f} (save cost {advice['save_cost'] * 1e3:.1f} ms, recovery "
              f"{advice['recovery']:.1f} s, MTBF {advice['mtbf']:.0f} s); model goodput there "
              f"{advice['model_daly']:.3f}; sweep of {args.sweep_minutes:g} min each", flush=True)
        sweep = {}
        for factor in (1 / 3, 1.0, 3.0):
            every = max(0.05, best * factor)
            name = f"x{factor:.2f}"
            g = sigkill_run(work / f"sweep-{name}", work / f"sweep-{name}.log", args.sweep_minutes,
                            args.kill_every, args.nproc, every)
            sweep[every] = g
            b, wall = g["buckets"], g["wall_seconds"]
            print(f"  every_seconds {every:6.2f}: goodput {g['goodput']:.3f} (lost {b['lost'] / wall:.1%}, "
                  f"save {b['save'] / wall:.1%})", flush=True)
        results["sweep"] = {str(k): v for k, v in sweep.items()}
        top = max(sweep, key=lambda k: sweep[k]["goodput"])
        print(f"advisor check: best measured every_seconds {top:.2f} (goodput {sweep[top]['goodput']:.3f}); the "
              f"advisor's {best:.2f} measured {sweep[max(0.05, best)]['goodput']:.3f}", flush=True)
    print(f"goodput: {', '.join(measured)} (target >= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"(event logs and checkpoints in {work})")


if __name__ == "__main__":
    main()
