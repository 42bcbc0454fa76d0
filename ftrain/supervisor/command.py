"""The launch description and what it turns into: torchrun's command line and the workers' environment.

Built in one place for every kind of launch (single- or multi-node, cold or warm), from one
:class:`LaunchSpec` that answers "multi-node?" once. Pure: no processes; the supervisor runs what this says.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ftrain import envvars
from ftrain.attempt import AttemptFiles
from ftrain.config import FtrainConfig, config_to_env
from ftrain.config.renamed import RENAMED_ENV
from ftrain.supervisor.agent import MODULE as AGENT_MODULE

#: torchrun prefixes each tee'd worker line with this (we set the template), so we can strip it for rank 0.
PREFIX_TEMPLATE = "@@ftrain-rank${rank}@@"
#: torchrun's --max-restarts: in effect unlimited; the supervisor's policy decides (ftrain/supervisor/groups.py).
TORCHRUN_RESTARTS = 10**6


@dataclass
class LaunchSpec:
    """Everything needed to start one attempt."""

    script: str
    script_args: list[str]
    nproc: int
    torchrun_args: list[str]
    run_id: str
    config: FtrainConfig
    extra_env: dict[str, str] = field(default_factory=dict)
    #: (MIN, MAX) of ``--nnodes``; MAX > 1 is a multi-node launch (see :mod:`ftrain.supervisor.groups`).
    nnodes: tuple[int, int] = (1, 1)

    @property
    def multinode(self) -> bool:
        return self.nnodes[1] > 1

    @property
    def elastic(self) -> bool:
        return self.nnodes[0] < self.nnodes[1]


def torchrun_command(spec: LaunchSpec, files: AttemptFiles, *, warm: bool) -> list[str]:
    """torchrun's command line for one attempt (``warm``: through the zygote, docs/FORMAT.md "Warm starts")."""
    args = list(spec.torchrun_args)
    if not any(a.startswith(("--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr",
                             "--standalone")) for a in args):
        # Single node: rendezvous on loopback with a free port, never another address.
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    if not any(a.startswith(("--rdzv-id", "--rdzv_id")) for a in args):
        args += ["--rdzv-id", spec.run_id]
    # Warm: torchrun itself is forked from the zygote too (through an entry: the job's process is the entry, which
    # passes signals and the exit status through), so a restart imports torch for it no more than for the ranks;
    # and torchrun starts a thin entry per rank, which has the zygote fork the real worker.
    entry = ["-m", "ftrain.supervisor.entry"] if warm else []
    return [sys.executable, *entry, "-m", AGENT_MODULE, "--nproc-per-node", str(spec.nproc), *args,
            # torchrun restarts its worker group itself, at once (a restart costs no new torchrun), and on
            # several nodes the rendezvous stays open (an agent that runs out of restarts closes it for every
            # node). Our policy decides whether to go on: it counts local failures, backs off after failures
            # that made no progress (a new torchrun after the delay) and gives up (see groups.py).
            "--max-restarts", str(TORCHRUN_RESTARTS),
            "--log-dir", str(files.ranks_dir), "--redirects", "3", "--tee", "3",
            *entry, spec.script, *spec.script_args]


def base_env(spec: LaunchSpec) -> dict[str, str]:
    """The workers' environment, less what is set per attempt: the zygote's too (a worker forked from it gets its
    attempt's whole environment, but what the interpreter read at its start must match)."""
    # A renamed key's old variable is already resolved into the config: the workers need not read it (and warn) again.
    env = {k: v for k, v in os.environ.items() if k not in RENAMED_ENV}
    env.update(config_to_env(spec.config))
    env.update(spec.extra_env)
    env[envvars.RUN_ID] = spec.run_id
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def worker_env(spec: LaunchSpec, files: AttemptFiles, attempt: int, zygote: dict[str, str]) -> dict[str, str]:
    """torchrun's (and so the workers') environment for one attempt; ``zygote``: how to reach it, if warm."""
    sup = spec.config.supervisor
    env = {**base_env(spec), **zygote}
    env.update({
        envvars.ATTEMPT: str(attempt), envvars.ATTEMPT_DIR: str(files.root), envvars.LAUNCHER_PID: str(os.getpid()),
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": PREFIX_TEMPLATE,
        # A preemption signal that reaches torchrun too (a whole-cgroup kill, SLURM's proctrack/linuxproc) is
        # ignored there (agent.py): we tell the workers, and torchrun must not stop them while they save. The
        # signals torchrun still handles stop its workers and wait our grace period, not its 30 s, before SIGKILL.
        "TORCHELASTIC_SIGNALS_TO_HANDLE": ",".join(sorted({"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"}
                                                          - set(sup.preemption_signals))),
        envvars.AGENT_IGNORES: ",".join(sorted(sup.preemption_signals)),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(sup.grace_seconds) + 5),
    })
    # Without this, workers share a store hosted in the group-rank-0 agent across worker groups, and a new group
    # reads the dead group's gloo addresses from it (measured, torch 2.13: after a node loss the survivors fail
    # "connectFullMesh ... Connection refused" over and over; on one node, restarts failed or hung). With it,
    # each group's rank 0 hosts a fresh store.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if spec.elastic:
        env[envvars.ELASTIC] = "1"
    return env
