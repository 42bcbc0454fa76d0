"""Shared contract: signal names shared by the supervisor, the workers and the config (one definition each).

Shared contract: imported on both sides of the process boundary; no torch.
"""
from __future__ import annotations

#: Signals that may mean "preemption: save and exit" (SIGKILL and SIGSTOP cannot be caught).
CATCHABLE_PREEMPTION_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT")
#: The default ``supervisor.preemption_signals``: SIGTERM (Kubernetes, cloud VMs), SIGUSR1 (SLURM ``--signal``).
DEFAULT_PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
#: The hang detector sends this to ask a worker for its Python stacks; never a preemption signal.
STACK_DUMP_SIGNAL = "SIGUSR2"
#: What ``ftrain launch`` catches from its first instruction, before its config is read.
EARLY_SIGNALS = (*DEFAULT_PREEMPTION_SIGNALS, "SIGINT")
