"""A real SLURM on this one host, for the scheduler tier (tests/slurm/): munge, slurmctld and two slurmd "nodes".

Debian's Slurm is built with multiple-slurmd, so two ``slurmd -N nX`` on 127.0.0.1 are two nodes to the controller
(docs/schedulers.md). Everything is private to one :class:`SlurmCluster`: its own munge key and socket, its own
ports, config, state and spool directories under a temporary directory, and ``SLURM_CONF`` pointing at them; the
machine's /etc/slurm and /run/munge are never used. The daemons run in the foreground as our children, and
:meth:`SlurmCluster.close` ends them and every process of every job on every exit path.

The config keeps the requeue path short, as the recipe's docs say an admin may: ``cred_expire=5`` (a requeued job
waits for its old credential to expire) and ``sched_interval=2``. CPUs are allocated one by one (cons_tres), so
two jobs can share a node. ``ProctrackType=proctrack/linuxproc`` is the
variant in which a step's signal reaches every process of the step, torchrun included.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psutil

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "scancel")


def missing() -> str | None:
    """Why a real SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "the SLURM tier runs its daemons as root (SlurmUser=root); run it as root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return (f"no {', '.join(absent)}: install Debian's slurmctld slurmd slurm-client munge "
                "(`make test-slurm` does)")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CONF = """\
ClusterName=ftraintest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/sock,cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdTimeout=5
MessageTimeout=5
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munge + slurmctld + one slurmd per node of :data:`NODES`, all on 127.0.0.1, private to this object."""

    def __init__(self, cpus: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ftrain-slurm-"))
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True)
        os.chmod(self.root / "munge", 0o711)  # munged refuses a socket directory others cannot reach
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ports = _free_ports(2 + len(NODES))
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                          "State=UNKNOWN" for n, p in zip(NODES, ports[2:], strict=True))
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(CONF.format(root=self.root, ctld_port=ports[0], slurmd_port=ports[1], nodes=nodes,
                                         names=",".join(NODES)))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115  (closed with the daemon)
        self.daemons[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)
        out.close()

    def _start(self) -> None:
        m = self.root / "munge"
        self._spawn("munged", [_binary("munged"), "-F", "-f", f"--socket={m}/sock", f"--key-file={m}/munge.key",
                               f"--log-file={self.root}/log/munged.log", f"--pid-file={m}/pid",
                               f"--seed-file={m}/seed", "--num-threads=2"])
        self._until(lambda: (m / "sock").exists(), "munged's socket")
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        for n in NODES:
            self.start_node(n)
        self._until(lambda: self.idle_nodes() == set(NODES), "both nodes idle", timeout=30)

    def start_node(self, name: str) -> None:
        """Start node ``name``'s slurmd, unless it runs (a node coming back: ReturnToService=2 takes it in)."""
        if name in self.daemons and self.daemons[name].poll() is None:
            return
        self._spawn(name, [_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)])

    def wait_idle(self, name: str, timeout: float = 30) -> None:
        self._until(lambda: name in self.idle_nodes(), f"node {name} idle", timeout)

    def _until(self, ok: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM: no {what} ({'exited: ' + ', '.join(dead) if dead else 'timed out'}); "
                                   f"logs in {self.root / 'log'}:\n{self.logs()[-3000:]}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / "log").glob("*")))

    # ------------------------------------------------------------------------------------------------ clients
    def run(self, *cmd: str, check: bool = True, env: Mapping[str, str] | None = None) -> str:
        out = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                             timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def idle_nodes(self) -> set[str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return {n for n, state in (line.split() for line in out.splitlines() if line.strip()) if state == "idle"}

    def sbatch(self, script: Path, *options: str, env: Mapping[str, str] | None = None) -> int:
        out = self.run("sbatch", "--parsable", *options, str(script), env=env)
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RunTime, Restarts, ...); empty once the job is gone."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not {'/'.join(states)} within {timeout:.0f}s: {info}\n"
                                   f"{self.logs()[-3000:]}")
            time.sleep(0.2)

    # ------------------------------------------------------------------------------------------------ processes
    def _stepds(self) -> dict[psutil.Process, str]:
        """This cluster's slurmstepds, each with the node it runs for: a slurmstepd holds its slurmd's log open.
        (Its environment cannot tell: slurmstepd writes its title over it.)"""
        logs = {str(self.root / "log" / f"slurmd-{n}.log"): n for n in NODES}
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if (p.info["cmdline"] or [""])[0].startswith("slurmstepd"):
                    node = next((logs[f.path] for f in p.open_files() if f.path in logs), None)
                    if node is not None:
                        out[p] = node
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def job_processes(self, node: str | None = None) -> list[psutil.Process]:
        """Every process of every job of this cluster (on ``node`` only, if given): slurmstepds and descendants."""
        out = []
        for p, on in self._stepds().items():
            if node in (None, on):
                try:
                    out += [p, *p.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
        return out

    def node_processes(self, node: str) -> list[psutil.Process]:
        """What dies with node ``node``: its slurmd and every process of a job there."""
        alive = self.daemons[node].poll() is None
        return [psutil.Process(self.daemons[node].pid)] * alive + self.job_processes(node)

    def kill_node(self, node: str) -> None:
        """The node is gone at once, as a machine that loses power: SIGKILL to everything on it, all together."""
        _kill_all(self.node_processes(node))
        self.daemons[node].wait(10)

    def close(self) -> None:
        """Cancel every job, then end every process of every job and the daemons (SIGKILL where needed)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + 15
        while self.job_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill_all(self.job_processes())
        for name in [n for n in self.daemons if n != "munged"] + ["munged"]:
            p = self.daemons.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL every process of ``procs`` at once (none gets to react to another's death), then reap them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster()
    try:
        yield cluster
    finally:
        cluster.close()
