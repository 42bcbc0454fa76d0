"""Warm starts under a real torchrun: ``-m ftrain.supervisor.entry SCRIPT`` in place of the script (issue 23).

A zygote preloads torch once; torchrun starts one entry per rank, each gets a forked worker that runs a gloo job.
Checks what torchrun relies on: the workers' output in its per-rank log files, their exit codes in its report,
and its teardown when one rank's entry is SIGKILLed (the other rank stopped, every worker gone).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ftrain.supervisor.zygote import Zygote

from helpers import child_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm starts need Linux")]

SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank={rank} sum={t.item():.0f} pid={os.getpid()} ppid={os.getppid()} "
      f"entry={os.environ.get('FTRAIN_ENTRY_PID')} seed={torch.initial_seed()}", flush=True)
if sys.argv[1] == "hang":
    time.sleep(120)
dist.destroy_process_group()
sys.exit(3 if sys.argv[1] == "fail" and rank == 1 else 0)
"""
LINE = re.compile(r"rank=(\d) sum=3 pid=(\d+) ppid=(\d+) entry=(\d+) seed=(\d+)")


@pytest.fixture(scope="module")
def warm() -> Iterator[tuple[Zygote, Path, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="zy", dir="/tmp") as d:
        script = Path(d) / "job.py"
        script.write_text(SCRIPT)
        env = child_env()
        with open(Path(d) / "zygote.log", "wb") as log:
            zygote = Zygote.start(Path(d) / "z.sock", ("torch", "numpy", "ftrain"), str(script), env=env,
                                  stderr=log)
        try:
            assert zygote.status(timeout=120).state == "warm"
            yield zygote, script, {**env, **zygote.env()}
        finally:
            zygote.stop()


def torchrun(script: Path, mode: str, log_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0", "--log-dir", str(log_dir), "--redirects", "3",
         "--tee", "3", "-m", "ftrain.supervisor.entry", str(script), mode],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_logs(log_dir: Path, name: str) -> dict[int, str]:
    return {int(p.parent.name): p.read_text() for p in log_dir.rglob(name)}


def test_warm_workers_under_torchrun(warm: tuple[Zygote, Path, dict[str, str]], tmp_path: Path) -> None:
    zygote, script, env = warm
    proc = torchrun(script, "fail", tmp_path, env)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out
    assert re.search(r"exitcode\s*:\s*3", out), out  # rank 1's own exit code, in torchrun's report
    logs = rank_logs(tmp_path, "stdout.log")
    seen = {}
    for rank in (0, 1):
        m = LINE.search(logs[rank])  # in the file torchrun gave rank's entry (--redirects)
        assert m is not None and int(m[1]) == rank, logs
        assert int(m[3]) == zygote.pid and m[4] != m[2]  # forked by the zygote, on behalf of the entry
        seen[rank] = m[5]
    assert seen[0] != seen[1]  # torch's generator seeded afresh per worker, as in a fresh process
    assert "starting cold" not in "".join(rank_logs(tmp_path, "stderr.log").values())
    assert settled(zygote)


def test_sigkill_of_one_rank_tears_the_job_down(warm: tuple[Zygote, Path, dict[str, str]],
                                                tmp_path: Path) -> None:
    zygote, script, env = warm
    proc = torchrun(script, "hang", tmp_path, env)
    try:
        deadline = time.monotonic() + 120
        while len(zygote.workers()) < 2 or len(LINE.findall("".join(rank_logs(tmp_path, "stdout.log").values()))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        workers = zygote.workers()
        entries = {p.pid for p in psutil.Process(proc.pid).children()}
        assert set(workers) == entries  # torchrun's children are the entries; the zygote knows their workers
        victim = sorted(entries)[0]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # torchrun sees the rank die and stops the other one
        assert proc.returncode != 0
        assert re.search(r"Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9", out), out
        for worker in workers.values():
            try:
                psutil.Process(worker).wait(timeout=10)
            except psutil.NoSuchProcess:
                pass
        assert settled(zygote)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def settled(zygote: Zygote, timeout: float = 10.0) -> bool:
    """Whether the zygote's workers file is empty within ``timeout`` (it is rewritten just after each reap)."""
    deadline = time.monotonic() + timeout
    while zygote.workers() and time.monotonic() < deadline:
        time.sleep(0.02)
    return zygote.workers() == {}
