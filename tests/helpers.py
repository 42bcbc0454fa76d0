"""Helpers shared by the test tiers (``from helpers import ...``; pyproject puts tests/ on the path).

Fixtures live in conftest.py. The in-process helpers (tiny jobs, configs, data sets) serve tests/unit; the
process helpers (run the example, torchrun, ``ftrain launch``, orphan checks) serve tests/integration only:
tests/unit starts no process.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import torch
from torch.utils.data import Dataset

import ftrain
from ftrain.config import FtrainConfig, load_config
from ftrain.data import ResumableLoader

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train.py"


# ------------------------------------------------------------------ tensors and checkpoints
def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"tensor {name} differs"


def checkpoint_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint in ``root`` (all ranks), read and verified by ftrain's own reader."""
    from ftrain.checkpoint.format import step_dirname
    from ftrain.checkpoint.shard import read_shard_tensors
    from ftrain.checkpoint.store import CheckpointStore

    store = CheckpointStore(root)
    step = store.steps()[-1]
    manifest = store.validate(step)
    tensors = {}
    for rank in range(manifest.world_size):
        tensors.update(read_shard_tensors(store.storage, step_dirname(step), manifest, rank))
    return tensors


# ------------------------------------------------------------------ in-process sessions
#: Short names for the nested keys tests set most (cfg's keywords); any other keyword is a checkpoint.* key.
_SHORT = {
    "keep_last": "checkpoint.retention.keep_last", "keep_best": "checkpoint.retention.keep_best",
    "monitor": "checkpoint.selection.monitor", "mode": "checkpoint.selection.mode",
    "save_best_only": "checkpoint.selection.save_best_only",
    "load_best_at_end": "checkpoint.selection.load_best_at_end",
    "remote": "checkpoint.remote.url", "remote_keep_last": "checkpoint.remote.keep_last",
    "remote_retries": "checkpoint.remote.retries", "remote_wait_seconds": "checkpoint.remote.wait_seconds",
    "patience": "early_stopping.patience", "min_delta": "early_stopping.min_delta",
}


def cfg(path: Path, **keys: Any) -> FtrainConfig:
    """A config checkpointing to ``path``; ``keys`` by their short names (``_SHORT``) or as checkpoint.* keys."""
    overrides = {_SHORT.get(name, f"checkpoint.{name}"): value for name, value in keys.items()}
    return load_config(env={}, overrides={"checkpoint.dir": str(path), **overrides})


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One step on a random batch of 2 (draws from the global RNG, like dropout would)."""
    loss = model(torch.randn(2, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


class Job:
    """A tiny model/optimizer/scheduler/counter set, trained with the global RNG (dropout-like draws)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.counters = ftrain.Counters(seen=0)

    def register(self, session: ftrain.Session) -> None:
        session.register(model=self.model, optimizer=self.opt, scheduler=self.sched, counters=self.counters)

    def train(self, n: int) -> None:
        for _ in range(n):
            train_step(self.model, self.opt)
            self.sched.step()
            self.counters.seen += 2

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


class SgdJob:
    """Just a model and plain SGD (no scheduler, no counters): what the model-selection tests register."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train(self) -> None:
        train_step(self.model, self.opt)


def run_job(root: Path, steps: int, every: int = 10, **checkpoint: Any) -> Job:
    """A one-rank Session over a fresh :class:`Job`: restore, train to ``steps`` saving every ``every``, close."""
    job = Job()
    session = ftrain.Session(cfg(root, every_steps=every, **checkpoint))
    job.register(session)
    start = session.restore()
    for step in range(start + 1, steps + 1):
        job.train(1)
        session.step(step)
    session.close()
    return job


def job_state(job: Job) -> str:
    """One hash of everything a restore may touch: model, optimizer, scheduler, counters, RNG, requires_grad."""
    from ftrain.session import rng

    grads = {n: p.requires_grad for n, p in job.model.named_parameters()}
    return ftrain.state_sha256([("model", job.model.state_dict()), ("optimizer", job.opt.state_dict()),
                                ("scheduler", job.sched.state_dict()), ("counters", job.counters.state_dict()),
                                ("rng", rng.capture()), ("requires_grad", grads)])


def reseal(manifest_path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Edit a manifest's body as an attacker who knows the format would, and reseal its checksum (XXH3-128 over
    the canonical JSON of the body), so that it validates."""
    from ftrain.checkpoint import checksum

    doc = json.loads(manifest_path.read_bytes())
    edit(doc["body"])
    canonical = json.dumps(doc["body"], sort_keys=True, separators=(",", ":")).encode()
    doc[f"body_{checksum.ALGORITHM}"] = checksum.digest(canonical)
    manifest_path.write_bytes(json.dumps(doc).encode())


def reseal_file(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Replace file ``name`` of a checkpoint and record its new size and checksum in the resealed manifest."""
    from ftrain.checkpoint import checksum

    (ckpt_dir / name).write_bytes(data)

    def edit(body: dict[str, Any]) -> None:
        body["files"][name].update(size=len(data), checksum=checksum.digest(data))

    reseal(ckpt_dir / "manifest.json", edit)


# ------------------------------------------------------------------ data
class AugDataset(Dataset):
    """Item = [index, 3 x torch.rand, random.random, numpy.random.rand] as float64."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        t = torch.rand(3).tolist()
        return torch.tensor([float(i), *t, random.random(), float(np.random.rand())], dtype=torch.float64)


def collect_batches(loader: ResumableLoader, total: int) -> tuple[list, list]:
    """Collect ``total`` batches across epochs, with the (JSON round-tripped) state after each."""
    batches, states = [], []
    while len(batches) < total:
        for b in loader:
            batches.append(b)
            states.append(json.loads(json.dumps(loader.state_dict())))
            if len(batches) == total:
                break
    return batches, states


def check_resume(make: Callable[[], ResumableLoader], total: int, cuts: list[int]) -> list:
    """Resume fresh loaders from the reference's state after each of ``cuts`` batches: the rest must be identical."""
    ref, ref_states = collect_batches(make(), total)
    for k in cuts:
        loader = make()
        if k:
            loader.load_state_dict(ref_states[k - 1])
        got, states = collect_batches(loader, total - k)
        assert len(got) == len(ref[k:])
        for j, (a, b) in enumerate(zip(got, ref[k:])):
            assert torch.equal(a, b), f"cut {k}: batch {k + j} differs"
        assert states == ref_states[k:]
    return ref


# ------------------------------------------------------------------ real processes (tests/integration only)
#: The job of the shared ``ddp4_reference`` fixture (tests/integration/conftest.py): examples/train.py's DDP model,
#: 32 steps (an epoch of 2048 samples in global batches of 64), no DataLoader workers. Neither the save schedule
#: nor printing changes the trained state (the final hash covers model and optimizer), so a test that saves or
#: prints at other steps compares with the same uninterrupted run.
DDP4_JOB = ["--steps", "32", "--save-every", "4", "--print-every", "1", "--workers", "0"]
#: The job of the shared ``ddp2_reference`` fixture: the DDP model at 2 ranks, 40 steps, 2 DataLoader workers each
#: (the example's default), consumed-sample logs on.
DDP2_JOB = ["--steps", "40", "--save-every", "10", "--print-every", "0"]


class Reference(NamedTuple):
    """A shared uninterrupted run: its output (final_state_sha256 in stdout), checkpoints and sample logs."""

    run: subprocess.CompletedProcess[str]
    ckpt: Path
    logs: Path


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def final_hash(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("final_state_sha256=")]
    assert len(lines) == 1, f"expected one final_state_sha256 line, got {lines}:\n{output[-3000:]}"
    return lines[0].split("=", 1)[1]


def read_index_log(directory: Path, rank: int) -> dict[int, list[int]]:
    """step -> the sample indices rank ``rank`` consumed (examples/train.py --index-log, at one world size),
    checking that a step replayed after a resume consumed the same samples."""
    from ftrain.data import samplelog

    steps: dict[int, list[int]] = {}
    for group in samplelog.read(directory):
        for step, idx in sorted(group.steps.get(rank, {}).items()):
            if step in steps:
                assert steps[step] == idx, f"step {step} replayed with different samples: {steps[step]} vs {idx}"
            steps[step] = idx
    return steps


def _succeeded(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_example(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)
    return _succeeded(proc, "example") if check else proc


def torchrun(script: Path, args: list[str], env: dict[str, str] | None = None, *, nproc: int = 2,
             timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``script`` under torchrun (c10d rendezvous on a free loopback port, no restarts)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0", str(script), *args]
    proc = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    return _succeeded(proc, "torchrun") if check else proc


class Background:
    """A process started now, its output collected by a thread; :meth:`result` waits for it like
    ``subprocess.run``. For an uninterrupted reference run started alongside the chaos run it is compared with:
    while the chaos run sleeps (paced steps, restarts) or runs one process, the reference uses the idle core."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, *, timeout: float = 300) -> None:
        self.cmd, self.timeout = cmd, timeout
        self.proc = subprocess.Popen(cmd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._done: tuple[str, str] = ("", "")
        self._reader = threading.Thread(target=self._communicate, daemon=True)
        self._reader.start()

    def _communicate(self) -> None:
        self._done = self.proc.communicate()

    def result(self) -> subprocess.CompletedProcess[str]:
        self._reader.join(self.timeout)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join(10)
            raise subprocess.TimeoutExpired(self.cmd, self.timeout, *self._done)
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, *self._done)


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc`` and every descendant, if still running (a reference a failed test never waited for)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


class Launch:
    """A running `ftrain launch`, its output collected by a thread so the test can wait for lines."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ftrain", "launch", *args], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while time.monotonic() < deadline:
            m = rx.search(self.output)
            if m:
                return m
            if self.proc.poll() is not None:
                self._reader.join(5)
                m = rx.search(self.output)
                if m:
                    return m
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return rc


def launch_env(**extra: str) -> dict[str, str]:
    return child_env(FTRAIN_SUPERVISOR_BACKOFF_SECONDS="0.2", FTRAIN_SUPERVISOR_BACKOFF_MAX_SECONDS="1", **extra)


def _live_processes(match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if match(p):
                found.append(p)
        except psutil.Error:
            pass
    return found


def job_processes(run_id: str) -> list[psutil.Process]:
    """Every live process whose environment carries this run id (supervisor excluded: it sets it for children)."""
    return _live_processes(lambda p: p.environ().get("FTRAIN_RUN_ID") == run_id
                           and p.status() != psutil.STATUS_ZOMBIE)


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Every process with ``marker`` in an argument (a job started without `ftrain launch` has no run id)."""
    return _live_processes(lambda p: any(marker in part for part in p.cmdline()))


def assert_no_orphans(run_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not job_processes(run_id):
            return
        time.sleep(0.2)
    left = job_processes(run_id)
    assert not left, f"orphans of run {run_id}: {[(p.pid, p.cmdline()) for p in left]}"
