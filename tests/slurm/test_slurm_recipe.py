"""launcher/slurm/train.sbatch under a real SLURM (tests/slurm_cluster.py: munge, slurmctld, two slurmd on this host).

The recipe runs as users run it: the same file, with sizes and paths set through its documented variables and
sbatch's own options. Each scenario stops the job the way a cluster does, lets SLURM requeue it, and checks the end
against an uninterrupted run: the final state hash (same world size), or every sample consumed exactly once at the
same step (a node lost). No process of the job may be left. `make test-slurm` runs this tier (docs/schedulers.md).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from slurm_cluster import SlurmCluster, missing, slurm_cluster

from ftrain.data import samplelog

from helpers import EXAMPLE, ROOT, child_env

# The time-limited job runs beside the other scenarios (it mostly waits for slurmctld's minute tick): started first.
pytestmark = [pytest.mark.skipif(missing() is not None, reason=str(missing())), pytest.mark.usefixtures("time_limited")]

RECIPE = ROOT / "launcher" / "slurm" / "train.sbatch"
STEPS = 60
STEPS_PER_EPOCH = 32  # 2048 samples in global batches of 64
#: The job's training arguments: slow enough to be stopped mid-way, with DataLoader workers (they are processes of
#: the step too, and get every signal a step's process gets under proctrack/linuxproc).
TRAIN = f"--steps {STEPS} --save-every 5 --step-sleep 0.12 --workers 1 --print-every 1"
#: SLURM's KillWait is 10 s in this cluster's config: a final save after SIGTERM must fit in it.
GRACE = "8"


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, list[int]]]:
    """The uninterrupted run at the jobs' world size (2 ranks): its final hash and consumed samples."""
    root = tmp_path_factory.mktemp("reference")
    out = subprocess.run([sys.executable, "-m", "ftrain", "launch", "--nproc", "2", "--ckpt-dir", str(root / "ckpt"),
                          str(EXAMPLE), *TRAIN.split(), "--step-sleep", "0", "--index-log", str(root / "index")],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return final_hash(out.stdout), samplelog.history(root / "index")


@pytest.fixture(scope="module")
def time_limited(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A job cut by its time limit: --time=1 with B:USR1@50, on one node (both ranks there), beside the others.

    slurmctld sends the signal on its minute tick, up to 60 s early, so each run of the job is cut somewhere in its
    first minute; 66 s of steps make sure it is cut at least once, however the ticks fall."""
    tmp = tmp_path_factory.mktemp("time-limited")
    return Job(slurm, tmp, "--time=1", "--signal=B:USR1@50", "--nodelist=n1", nodes=1, GPUS_PER_NODE="2",
               TRAIN_ARGS=f"{TRAIN.replace('--step-sleep 0.12', '--step-sleep 1.1')} --index-log {tmp / 'index'}")


def final_hash(text: str) -> str:
    found = re.findall(r"final_state_sha256=(\w+)", text)
    assert len(found) == 1, f"expected one final hash, got {found}:\n{text[-3000:]}"
    return found[0]


class Job:
    """One submission of the recipe: its id, output file and checkpoint directory."""

    def __init__(self, slurm: SlurmCluster, tmp_path: Path, *options: str, nodes: int = 2, **variables: str) -> None:
        self.slurm, self.ckpt = slurm, tmp_path / "ckpt"
        self.index = tmp_path / "index"
        port = _port()
        env = {"TRAIN_SCRIPT": str(EXAMPLE), "TRAIN_ARGS": f"{TRAIN} --index-log {self.index}",
               "CKPT_DIR": str(self.ckpt), "GPUS_PER_NODE": "1", "GRACE_SECONDS": GRACE, "RDZV_PORT": str(port),
               "FTRAIN": str(Path(sys.executable).parent / "ftrain"), **child_env(), **variables}
        self.id = slurm.sbatch(RECIPE, f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                               f"--output={tmp_path}/job-%j.out", *options, env=env)
        self.out = tmp_path / f"job-{self.id}.out"

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def step(self) -> int:
        return max((int(s) for s in re.findall(r"^\d+: step (\d+) ", self.output, re.M)), default=0)

    def wait_step(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.step() < n:
            info = self.slurm.job(self.id)
            assert info.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"), (info, self.output)
            assert time.monotonic() < deadline, f"no step {n} within {timeout}s:\n{self.output[-3000:]}"
            time.sleep(0.2)

    def wait_running_again(self, restarts: int, timeout: float = 90) -> None:
        """Until SLURM has requeued the job ``restarts`` times in all and started it again."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.slurm.job(self.id)
            if int(info.get("Restarts", 0)) >= restarts and info.get("JobState") == "RUNNING":
                return
            assert time.monotonic() < deadline, f"not requeued and running: {info}\n{self.output[-3000:]}"
            time.sleep(0.3)

    def finish(self, timeout: float = 240) -> dict[str, str]:
        info = self.slurm.wait_job(self.id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout)
        assert info["JobState"] == "COMPLETED", (info, self.output[-4000:])
        self.assert_no_leftovers()
        return info

    def assert_no_leftovers(self) -> None:
        deadline = time.monotonic() + 20
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running: {[(p.pid, p.cmdline()) for p in left]}"

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this job: in its SLURM job (by their environment) or naming its checkpoint directory."""
        mine, job = str(self.ckpt), str(self.id)
        out = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            try:
                env = p.info["environ"] or {}
                text = " ".join(p.info["cmdline"] or []) + " ".join(env.values())
                if (env.get("SLURM_JOB_ID") == job or mine in text) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def final_checkpoints(self) -> list[int]:
        """The steps the job's launches named as their final checkpoint when stopped."""
        return [int(s) for s in re.findall(r"final checkpoint at step (\d+)", self.output)]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_usr1_to_the_batch_shell_saves_requeues_and_resumes_exactly(
        slurm: SlurmCluster, reference: tuple[str, dict[int, list[int]]], tmp_path: Path) -> None:
    job = Job(slurm, tmp_path)
    job.wait_step(12)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job.id))  # what --signal=B:USR1@N does at the time limit
    job.wait_running_again(1)
    job.finish()
    assert final_hash(job.output) == reference[0]
    assert len(job.final_checkpoints()) == 2  # each node's launch: the same final checkpoint
    assert "requeueing job" in job.output


def test_usr1_to_every_process_of_the_step_saves_once_and_requeues(
        slurm: SlurmCluster, reference: tuple[str, dict[int, list[int]]], tmp_path: Path) -> None:
    # proctrack/linuxproc: slurmstepd delivers the step's signal to every process of the step, torchrun and the
    # DataLoader workers included. torchrun used to die of it, and the final checkpoint was lost.
    job = Job(slurm, tmp_path)
    job.wait_step(12)
    slurm.run("scancel", "--signal=USR1", str(job.id))
    job.wait_running_again(1)
    job.finish()
    assert final_hash(job.output) == reference[0]
    finals = job.final_checkpoints()
    assert len(finals) == 2 and finals[0] == finals[1] >= 12, job.output[-4000:]
    assert "no final checkpoint" not in job.output


def test_scontrol_requeue_resumes_from_the_newest_checkpoint_exactly(
        slurm: SlurmCluster, reference: tuple[str, dict[int, list[int]]], tmp_path: Path) -> None:
    # SLURM ends the job with SIGTERM to every step's processes (and SIGKILL KillWait later), then requeues it.
    job = Job(slurm, tmp_path)
    job.wait_step(12)
    slurm.run("scontrol", "requeue", str(job.id))
    job.wait_running_again(1)
    job.finish()
    assert final_hash(job.output) == reference[0]
    assert "not requeueing" in job.output  # the script leaves the requeue to SLURM: no second one


def test_a_time_limit_signal_requeues_until_the_run_is_done(
        time_limited: Job, reference: tuple[str, dict[int, list[int]]]) -> None:
    # However many times and wherever the signal cut it, the end is the uninterrupted run's.
    info = time_limited.finish(timeout=400)
    assert int(info["Restarts"]) >= 1, time_limited.output[-4000:]
    assert "SIGUSR1 (time limit near" in time_limited.output
    assert final_hash(time_limited.output) == reference[0]


def test_a_lost_node_leaves_the_job_running_on_the_other_and_every_sample_once(
        slurm: SlurmCluster, reference: tuple[str, dict[int, list[int]]], tmp_path: Path) -> None:
    job = Job(slurm, tmp_path, "--no-kill")
    job.wait_step(12)
    slurm.kill_node("n2")  # not the batch host: the job goes on at 1 rank
    try:
        job.finish()
    finally:
        slurm.start_node("n2")
        slurm.wait_idle("n2")
    assert re.search(r"world 1: .*starting after step \d+", job.output), job.output[-4000:]
    got = samplelog.history(job.index)
    assert samplelog.audit(got, reference[1], STEPS_PER_EPOCH, 2048) == []


def test_the_batch_host_lost_the_job_is_requeued_and_resumes_exactly(
        slurm: SlurmCluster, reference: tuple[str, dict[int, list[int]]], tmp_path: Path) -> None:
    # The batch host takes the script and the rendezvous store with it. The other node's ftrain launch exits, and its
    # task epilog (the recipe's) finds the store gone while the job still runs: it requeues the job. Before, Slurm
    # left the job RUNNING with nothing running until its time limit.
    job = Job(slurm, tmp_path, "--no-kill")
    job.wait_step(12)
    slurm.kill_node("n1")
    try:
        deadline = time.monotonic() + 60
        while int(slurm.job(job.id).get("Restarts", 0)) < 1:
            assert time.monotonic() < deadline, (slurm.job(job.id), job.output[-3000:])
            time.sleep(0.3)
        slurm.start_node("n1")  # the machine back, or a new one: the requeued job needs two nodes
        job.finish()
    finally:
        slurm.start_node("n1")
        slurm.wait_idle("n1")
    assert final_hash(job.output) == reference[0]
    log = (job.ckpt / "logs" / f"requeue-{job.id}.log").read_text()
    assert "task epilog on n2: the rendezvous store" in log and "requeueing job" in log
