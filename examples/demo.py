"""`make demo`: crash a training run on purpose, resume it, and prove the result is exact.

1. An uninterrupted reference run of examples/train.py.
2. The same run, SIGKILLed at a random step, then killed again *inside* a
   checkpoint write (between the shard bytes and the manifest), and restarted
   after each kill. ftrain resumes from the newest checkpoint that validates.
3. Both runs' ``final_state_sha256`` lines are compared.

(Until `ftrain launch` lands this drives one process; it will become the
4-process supervised demo.)
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
STEPS = 120


def run(args: list[str], env: dict[str, str], kill_at: int | None = None) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if "restored step" in line or "starting fresh" in line or "final_state" in line:
            print("   ", line.rstrip())
        m = re.match(r"step (\d+) ", line)
        if kill_at is not None and m and int(m.group(1)) >= kill_at:
            print(f"    >>> SIGKILL at step {m.group(1)}")
            proc.kill()
            break
    return proc.wait(), "".join(out)


def final_hash(out: str) -> str:
    return re.search(r"final_state_sha256=(\w+)", out).group(1)  # type: ignore[union-attr]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ftrain-demo-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--steps", str(STEPS), "--save-every", "10", "--print-every", "1"]
    print(f"[demo] 1/3 uninterrupted reference run ({STEPS} steps)")
    rc, out = run([*common, "--ckpt-dir", str(work / "ref")], env)
    ref = final_hash(out)

    kill_at = random.randint(15, 55)
    args = [*common, "--ckpt-dir", str(work / "ckpt")]
    print(f"[demo] 2/3 the same run, SIGKILLed at step {kill_at} ...")
    run(args, env, kill_at=kill_at)
    print("[demo]     ... restarted, and killed again inside the save of step 80 (before its manifest) ...")
    rc, _ = run(args, {**env, "FTRAIN_FAULTS": "kill@save.before_manifest:step=80"})
    print(f"    >>> process died with {rc} during the save")
    print("[demo]     ... restarted once more, to the end")
    rc, out = run(args, env)
    got = final_hash(out)
    print("[demo] 3/3 compare")
    print(f"    reference   final_state_sha256={ref}")
    print(f"    interrupted final_state_sha256={got}")
    subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "ls", str(work / "ckpt")], env=env)
    if got != ref or rc != 0:
        print("[demo] FAILED: the resumed run differs from the reference")
        return 1
    print("[demo] OK: bit-identical after 2 kills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
