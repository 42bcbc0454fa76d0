"""Supervisor side: torchrun (torch's elastic agent) as ``ftrain launch`` runs it: deaf to preemption signals.

A preemption signal can reach every process of the job at once: SLURM's ``proctrack/linuxproc`` delivers a step's
signal to each process of the step, systemd's ``KillMode=control-group`` and a node shutdown do the same. torchrun
acts on what it gets: without a handler (SIGUSR1 before its first worker group) it dies; with one (the signals in
``TORCHELASTIC_SIGNALS_TO_HANDLE``) it stops its worker group and shuts its rendezvous down. Either way it takes
the workers away at the moment they must agree on a step and save, and the final checkpoint is lost (found under a
real SLURM, docs/schedulers.md).

The decision belongs to ``ftrain launch`` alone: it got the same signal, and it tells each worker itself (and the
workers that got it directly act on it once, as they do on the supervisor's). So torchrun runs here with a handler
that ignores each preemption signal named in ``FTRAIN_AGENT_IGNORES`` (``command.py`` sets it and leaves those
signals out of ``TORCHELASTIC_SIGNALS_TO_HANDLE``, so torchrun's own handlers do not replace ours). A handler,
unlike ``SIG_IGN``, is reset to the default by ``exec``: the workers torchrun starts get the default disposition,
as they would without us. ``ftrain launch`` ends torchrun with SIGKILL (or a signal it still handles).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from types import FrameType

from ftrain import envvars

#: This module, as ftrain launch runs it (``python -m``); the zygote knows torchrun by it (warm_worker.py).
MODULE = "ftrain.supervisor.agent"
#: The module this one runs as __main__: torchrun.
TORCHRUN = "torch.distributed.run"

_told: set[int] = set()


def _ignore(signum: int, frame: FrameType | None) -> None:
    if signum not in _told:  # once per signal: a second one is ftrain launch's business too
        _told.add(signum)
        name = signal.Signals(signum).name
        print(f"[ftrain] torchrun ignores {name}: ftrain launch handles preemption and tells the workers",
              file=sys.stderr, flush=True)


def ignore_preemption_signals(names: str) -> list[signal.Signals]:
    """Install :func:`_ignore` for each signal in ``names`` (comma-separated); the signals it installed it for."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        sig = signal.Signals[name]
        signal.signal(sig, _ignore)
        out.append(sig)
    return out


def main() -> None:
    ignore_preemption_signals(os.environ.get(envvars.AGENT_IGNORES, ""))
    runpy.run_module(TORCHRUN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
