"""`make demo`: a 4-process training job survives a crash and a preemption, and ends bit-identical.

1. An uninterrupted reference: ``ftrain launch --nproc 4 examples/train.py``.
2. The same job with an injected SIGKILL of rank 2 at a random step (the
   supervisor restarts the job from the newest valid checkpoint), then a SIGTERM
   to the supervisor (a preemption: all ranks agree on a step, save, and exit with
   code 75), then a relaunch of the same command, which resumes and finishes.
3. The two ``final_state_sha256`` lines are compared.
4. ``ftrain goodput`` adds up where the interrupted job's wall time went, from its event log, and draws
   the timeline (``timeline.png`` beside the checkpoints).
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 120
SHOW = re.compile(r"\[ftrain launch\]|restored step|starting fresh|preempted|final_state_sha256|exiting")


def launch(ckpt: Path, env: dict[str, str], *, preempt_at: int | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "ftrain", "launch", "--nproc", "4", "--ckpt-dir", str(ckpt),
           "--save-every-steps", "10", "examples/train.py", "--steps", str(STEPS), "--print-every", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if SHOW.search(line) and "[rank " not in line:
            print("   ", line.rstrip(), flush=True)
        m = re.match(r"step (\d+) ", line)
        if preempt_at is not None and m and int(m.group(1)) >= preempt_at:
            print(f"    >>> demo: SIGTERM to the supervisor (pid {proc.pid}) at step {m.group(1)}: a preemption notice",
                  flush=True)
            proc.send_signal(signal.SIGTERM)
            preempt_at = None
    return proc.wait(), "".join(out)


def final_hash(out: str) -> str:
    m = re.search(r"^final_state_sha256=(\w+)", out, re.M)
    if not m:
        sys.exit(f"[demo] no final_state_sha256 line in the output:\n{out[-3000:]}")
    return m.group(1)


def main() -> int:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ftrain-demo-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "0.5"}
    print(f"[demo] 1/3 uninterrupted reference: ftrain launch --nproc 4 examples/train.py --steps {STEPS}", flush=True)
    rc, out = launch(work / "ref", env)
    ref = final_hash(out)

    crash = random.randint(25, 55)
    once = work / "faults-fired"
    once.mkdir()
    chaos_env = {**env, "FTRAIN_FAULTS": f"kill@step:step={crash}:rank=2", "FTRAIN_FAULTS_ONCE_DIR": str(once)}
    print(f"[demo] 2/3 the same job; rank 2 is SIGKILLed at step {crash}, then the job is preempted at step 90",
          flush=True)
    rc, _ = launch(work / "ckpt", chaos_env, preempt_at=90)
    print(f"    >>> demo: ftrain launch exited with {rc} (75 = preempted, resumable); relaunching the same command",
          flush=True)
    if rc != 75:
        print("[demo] FAILED: expected exit code 75 after the preemption")
        return 1
    rc, out = launch(work / "ckpt", chaos_env)
    got = final_hash(out)
    print("[demo] 3/3 compare")
    print(f"    uninterrupted  final_state_sha256={ref}")
    print(f"    interrupted    final_state_sha256={got}")
    subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "ls", str(work / "ckpt")], env=env)
    if rc != 0 or got != ref:
        print("[demo] FAILED: the resumed job differs from the uninterrupted one")
        return 1
    png = work / "timeline.png"
    print(f"[demo] where the interrupted job's time went: ftrain goodput {work / 'ckpt'} --plot {png}", flush=True)
    if subprocess.run([sys.executable, "-m", "ftrain", "goodput", str(work / "ckpt"), "--plot", str(png)],
                      env=env).returncode != 0:
        print("[demo] FAILED: ftrain goodput")
        return 1
    print(f"[demo] OK: bit-identical after a crash and a preemption ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
