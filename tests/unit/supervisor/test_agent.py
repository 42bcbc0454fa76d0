"""torchrun as ftrain launch runs it (agent.py): a preemption signal sent to every process of the job must not stop
torchrun while the workers save; the decision is the supervisor's alone (issue 25, found under a real SLURM)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftrain import envvars
from ftrain.attempt import AttemptFiles
from ftrain.config import FtrainConfig, SupervisorConfig
from ftrain.supervisor import agent, warm_worker
from ftrain.supervisor.command import LaunchSpec, torchrun_command, worker_env


def spec(signals: list[str]) -> LaunchSpec:
    return LaunchSpec(script="train.py", script_args=[], nproc=2, torchrun_args=[], run_id="r",
                      config=FtrainConfig(supervisor=SupervisorConfig(preemption_signals=signals)))


@pytest.mark.parametrize("warm", [False, True])
def test_torchrun_runs_as_the_agent_cold_and_warm(tmp_path: Path, warm: bool) -> None:
    cmd = torchrun_command(spec(["SIGTERM", "SIGUSR1"]), AttemptFiles(tmp_path), warm=warm)
    assert cmd[cmd.index(agent.MODULE) - 1] == "-m" and ("ftrain.supervisor.entry" in cmd) == warm
    assert "torch.distributed.run" not in cmd
    # The zygote tells torchrun's fork from a rank's by this name (it dies with the zygote).
    assert warm_worker.TORCHRUN_MODULE == agent.MODULE


@pytest.mark.parametrize(("signals", "handled"), [
    (["SIGTERM", "SIGUSR1"], "SIGHUP,SIGINT,SIGQUIT"),
    (["SIGUSR1"], "SIGHUP,SIGINT,SIGQUIT,SIGTERM"),
    (["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"], ""),
])
def test_torchrun_handles_no_preemption_signal_and_ignores_each(tmp_path: Path, signals: list[str],
                                                               handled: str) -> None:
    env = worker_env(spec(signals), AttemptFiles(tmp_path), 0, {})
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == handled
    assert env[envvars.AGENT_IGNORES] == ",".join(sorted(signals))


CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from ftrain.supervisor.agent import ignore_preemption_signals
    ignore_preemption_signals("SIGTERM,SIGUSR1")
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1):
        os.kill(os.getpid(), sig)
    time.sleep(0.05)
    # What torchrun starts: an exec'd process gets the default disposition back, as without the agent.
    code = "import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM)"
    code += " == signal.SIG_DFL)"
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())
    print("alive")
""")


@pytest.mark.slow
def test_the_agent_survives_preemption_signals_and_its_children_get_the_default() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["True True", "alive"]
    # One line per signal, however many came.
    assert out.stderr.count("torchrun ignores SIGUSR1") == 1 and out.stderr.count("torchrun ignores SIGTERM") == 1
