"""Worker side: the end of a training process, without an abort at interpreter exit.

Why this exists. gloo's worker threads (``pt_gloo_runloop``) outlive ``destroy_process_group()``: modules, device
meshes and torch's own registries keep the process group alive until the interpreter is torn down. The thread
that runs a script's last collective wakes the main thread *before* it drops the work's tensors, and dropping a
tensor whose Python object belongs to C++ needs the GIL. If the main thread reaches interpreter finalization
first (the script had nothing left to do), that thread is made to exit while it waits for the GIL, inside a
``noexcept`` destructor: ``terminate called without an active exception``, SIGABRT, for a job that succeeded.
Seen in 1 run in 7 of a 4-rank FSDP2 job on 2 cores (a core dump shows the thread in
``~AsyncAllgatherCoalescedWork`` -> ``take_gil`` -> ``pthread_exit``); plain FSDP2 on gloo does it too.

So the exit hook, registered once per process by the first :class:`~ftrain.session.Session` (``atexit`` runs it
after the hooks registered later: the session's own flush, the script's):

1. tears down the default process group if the script left it up, unless the process is crashing (its peers
   may be gone, and a teardown must never wait on them);
2. releases the GIL until no collective thread has been runnable for :data:`SETTLE_SECONDS` (at most
   :data:`LIMIT_SECONDS`): a thread that needs the GIL to finish gets it while the interpreter is whole.

Cost: about ``SETTLE_SECONDS`` per process exit. Linux only (``/proc``); elsewhere step 2 is skipped.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("ftrain")

#: Names (``/proc/<pid>/task/<tid>/comm``) of the threads that run collectives and drop their tensors.
COLLECTIVE_THREADS = ("pt_gloo_runloop",)
#: How long every collective thread must have been idle (not runnable) before the interpreter may finalize.
SETTLE_SECONDS = 0.02
#: The longest the exit waits for that: an exit is never held up for long, whatever a thread is doing.
LIMIT_SECONDS = 2.0
_POLL_SECONDS = 0.002

_installed = False


def wait_idle(busy: Callable[[], bool], *, settle: float = SETTLE_SECONDS, limit: float = LIMIT_SECONDS,
              sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> bool:
    """Sleep (the GIL released) until ``busy()`` has been False for ``settle`` seconds; False if ``limit`` passed
    first. A thread waiting for the GIL is woken the moment it is released, so it shows as busy (runnable) until
    it is done; one idle look is not enough, hence the settle time."""
    start = clock()
    quiet_since: float | None = None
    while True:
        now = clock()
        if busy():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return True
        if now - start >= limit:
            return False
        sleep(_POLL_SECONDS)


def collective_threads_busy(task_dir: str = "/proc/self/task") -> bool:
    """Whether a collective thread of this process is runnable or in uninterruptible sleep (state R or D)."""
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        # "tid (comm) S ...": comm may hold spaces and parentheses, so split at the last ')'.
        head, _, rest = stat.rpartition(")")
        comm = head.partition("(")[2]
        if comm in COLLECTIVE_THREADS and rest.split()[:1] in (["R"], ["D"]):
            return True
    return False


def install() -> None:
    """Register the exit hook, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(_at_exit)


def _crashing() -> bool:
    # The interpreter records an uncaught exception here before it runs the exit hooks (SystemExit excepted).
    return getattr(sys, "last_value", None) is not None


def _at_exit() -> None:
    try:
        import torch.distributed as dist

        if not _crashing() and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # an exit hook must never turn a finished job into a failed one
        log.debug("process group teardown at exit failed: %s", e)
    if not wait_idle(collective_threads_busy):
        log.debug("collective threads still busy after %.1fs at exit", LIMIT_SECONDS)
