"""Make a child process die with its parent, even when the parent is SIGKILLed (Linux's PR_SET_PDEATHSIG);
and let the zygote adopt its workers' orphans (:func:`become_subreaper`).

Used as ``subprocess.Popen(preexec_fn=die_with_parent)`` for torchrun and the zygote: it runs in the child
between fork and exec, and the setting survives the exec. Two caveats the callers must respect:

* the signal fires when the *thread* that forked the child ends, not only the process: create such children
  from a thread that lives as long as the process (the main thread);
* a parent that died between the fork and the ``prctl`` is not noticed by the kernel: pass the parent's pid
  and the child leaves at once if its parent is already gone.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(parent: int | None = None) -> None:
    """In the child: receive SIGKILL when the parent dies. ``parent``: the parent's pid, checked after the prctl.

    SIGKILL, not SIGTERM: on SIGTERM torchrun forwards the signal but then may hang in its own interpreter
    shutdown, joining its --tee TailLog threads, with nobody left to kill it (observed in about 1 run of 5).
    No-op outside Linux.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if parent is not None and os.getppid() != parent:
            os._exit(1)


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux's PR_SET_CHILD_SUBREAPER; not inherited across fork).

    For the zygote, which reaps every child as soon as SIGCHLD arrives: a killed worker's DataLoader processes,
    killed with it, are zombies until reaped, and torchrun's teardown (and ours) waits for them to be gone.
    Left to the container's pid 1 here they stayed for 1.7 s. No-op outside Linux.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
