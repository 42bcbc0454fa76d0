"""`ftrain launch` with real processes: torchrun, gloo on loopback, real kills, hangs and preemptions."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftrain import exitcodes

from helpers import (
    EXAMPLE,
    Launch,
    assert_no_orphans,
    assert_same_tensors,
    checkpoint_tensors,
    child_env,
    final_hash,
    job_processes,
    launch_env,
)

pytestmark = pytest.mark.slow

STEPS = 60


def test_chaos_kills_hang_and_preemption_resume_bit_exact(tmp_path):
    """Four ranks; three SIGKILLs of random ranks at random steps (one inside a save), one hang, then a SIGTERM
    to the supervisor and a relaunch. The final state must equal an uninterrupted run's."""
    common = ["--nproc", "4", "--save-every-steps", "5", "--hang-timeout", "6", "--max-restarts", "10"]
    script = [str(EXAMPLE), "--steps", str(STEPS), "--print-every", "1"]
    ref = Launch([*common, "--ckpt-dir", str(tmp_path / "ref"), "--rdzv-id", "ref", *script], launch_env())
    assert ref.wait() == 0, ref.output[-4000:]
    ref_hash = final_hash(ref.output)

    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    r = [rng.randrange(4) for _ in range(4)]
    faults = [f"kill@step:step={rng.randint(3, 12)}:rank={r[0]}",
              f"kill@save.mid_write:step={rng.choice([20, 25])}:rank={r[1]}",
              f"kill@step:step={rng.randint(28, 38)}:rank={r[2]}",
              f"hang@step:step={rng.randint(41, 47)}:rank={r[3]}"]
    once = tmp_path / "once"
    once.mkdir()
    env = launch_env(FTRAIN_FAULTS=",".join(faults), FTRAIN_FAULTS_ONCE_DIR=str(once))
    ckpt = tmp_path / "ckpt"
    run = Launch([*common, "--ckpt-dir", str(ckpt), "--rdzv-id", "chaos", *script], env)
    run.wait_for(r"^step (5[0-9]) ", timeout=400)
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait()
    info = f"seed {seed}, faults {faults}:\n{run.output[-5000:]}"
    assert rc == exitcodes.PREEMPTED, info
    assert len(list(once.iterdir())) == 4, info
    # Four local failures (torchrun restarts each group itself; a new torchrun only after one without progress).
    assert len(re.findall(r"worker group \d+ (?:failed|hung) \(", run.output)) == 4, info
    assert "hang detected in worker group" in run.output, info
    # Warm starts (the default): every worker of every attempt forked from the launch's one zygote.
    [zlog] = (ckpt / "logs" / "chaos").glob("*/zygote.log")
    assert "warm after" in zlog.read_text() and "starting cold" not in run.output, info
    [private] = re.findall(r"zygote socket directory (\S+)", zlog.read_text())
    assert not Path(private).exists(), "the zygote's socket directory was left behind"
    stacks = list((ckpt / "logs" / "chaos").glob(f"*/attempt-*/stacks/rank-{r[3]:05d}.txt"))
    assert any("faults.py" in s.read_text() for s in stacks), "the hung rank's Python stack was not dumped"
    assert_no_orphans("chaos")

    again = Launch([*common, "--ckpt-dir", str(ckpt), "--rdzv-id", "chaos", *script], env)
    assert again.wait() == 0, again.output[-4000:]
    assert re.search(r"restored step (5\d)", again.output)
    assert final_hash(again.output) == ref_hash, f"seed {seed}: final state differs from the uninterrupted run"
    assert_same_tensors(checkpoint_tensors(ckpt), checkpoint_tensors(tmp_path / "ref"))
    assert_no_orphans("chaos")


def test_signal_to_every_process_gives_one_final_save_within_grace(tmp_path):
    ckpt = tmp_path / "ckpt"
    grace = 20.0
    run = Launch(["--nproc", "2", "--ckpt-dir", str(ckpt), "--save-every-steps", "1000", "--grace-seconds",
                  str(grace), "--rdzv-id", "preempt", str(EXAMPLE), "--steps", "100000", "--print-every", "1",
                  "--step-sleep", "0.01"], launch_env())
    # Mid-epoch (an epoch is 32 steps at 2 ranks): DataLoader workers are restarted at each epoch's end.
    run.wait_for(r"^step 12 ")
    procs = [psutil.Process(run.proc.pid), *psutil.Process(run.proc.pid).children(recursive=True)]
    if len(procs) < 1 + 1 + 2 + 4:  # a failed check must not leave the job running for later tests to trip on
        for p in procs:
            p.kill()
        raise AssertionError(f"expected the supervisor, torchrun, 2 ranks and 2 DataLoader workers each: {procs}")
    t0 = time.monotonic()
    for p in procs:  # like systemd's KillMode=control-group or a node shutdown: everyone at once
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    rc = run.wait()
    elapsed = time.monotonic() - t0
    assert rc == exitcodes.PREEMPTED, run.output[-4000:]
    assert elapsed < grace, f"took {elapsed:.1f}s, grace is {grace}s"
    saves = re.findall(r"saved step (\d+)", run.output)
    assert len(saves) == 1, f"expected exactly one (final) save, got {saves}"
    steps = [int(p.name.removeprefix("step-")) for p in ckpt.iterdir() if p.name.startswith("step-")]
    assert steps == [int(saves[0])]
    assert subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "verify", str(ckpt)], env=child_env(),
                          capture_output=True).returncode == 0
    assert_no_orphans("preempt")


def test_crash_loop_gives_up_with_a_root_cause_report(tmp_path):
    script = tmp_path / "always_fails.py"
    script.write_text(
        "import os, torch.distributed as dist, ftrain\n"
        "dist.init_process_group('gloo')\n"
        "s = ftrain.Session()\n"
        "s.restore()\n"
        "if dist.get_rank() == 1:\n"
        "    raise ValueError('boom: bad batch shape')\n"
        "dist.barrier()\n")
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--max-restarts", "2", "--rdzv-id", "loop",
                  str(script)], launch_env())
    rc = run.wait()
    out = run.output
    assert rc == exitcodes.FAILURE, out[-3000:]
    assert len(re.findall(r"attempt \d+: started torchrun", out)) == 3
    report = out[out.index("ftrain launch: gave up"):]
    assert "root cause (attempt 2): rank 1" in report and "ValueError: boom: bad batch shape" in report, report
    assert len(report.strip().splitlines()) <= 30, report
    assert_no_orphans("loop")


def test_sigkill_of_the_supervisor_leaves_no_orphans(tmp_path):
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--rdzv-id", "orphan", str(EXAMPLE),
                  "--steps", "100000", "--print-every", "1", "--step-sleep", "0.01"], launch_env())
    run.wait_for(r"^step 10 ")
    assert len(job_processes("orphan")) >= 5
    run.proc.kill()
    run.wait()
    assert_no_orphans("orphan", timeout=40)


def test_a_plain_torchrun_script_survives_as_many_kills_as_max_restarts(tmp_path):
    """No ftrain.Session: no heartbeats, no ftrain checkpoints. Its own torch.save progress is invisible to the
    supervisor, so the crash-loop guard must not stop it: three kills, max_restarts 3, then it finishes."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import os, signal, sys\n"
        "import torch\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "kills = os.path.join(sys.argv[1], 'kills')\n"
        "done = len(os.listdir(kills)) if os.path.isdir(kills) else 0\n"
        "dist.barrier()\n"
        "if dist.get_rank() == 1 and done < 3:\n"
        "    os.makedirs(kills, exist_ok=True)\n"
        "    open(os.path.join(kills, str(done)), 'w').close()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "dist.barrier()\n"
        "print('plain script finished', flush=True)\n"
        "dist.destroy_process_group()\n")
    run = Launch(["--nproc", "2", "--ckpt-dir", str(tmp_path / "c"), "--rdzv-id", "plain", "--max-restarts", "3",
                  str(script), str(tmp_path)], launch_env(FTRAIN_SUPERVISOR_MAX_ATTEMPTS_WITHOUT_PROGRESS="2"))
    assert run.wait(300) == 0, run.output[-4000:]
    assert len(os.listdir(tmp_path / "kills")) == 3
    assert run.output.count("torchrun restarts the workers at once") == 3 and "crash loop" not in run.output
    assert len(re.findall(r"started torchrun", run.output)) == 1  # every restart inside the one torchrun
    assert_no_orphans("plain")
