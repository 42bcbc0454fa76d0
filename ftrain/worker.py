"""What a training process does for fault tolerance besides checkpoints.

* **Preemption flag.** The configured signals (``supervisor.preemption_signals``)
  only set a flag: saving inside a signal handler is unsafe (Lightning learned
  this). ``Session.step`` reads the flag at the next step boundary, all ranks
  agree, save once and exit with ``exitcodes.PREEMPTED``. Repeated signals are
  harmless (the flag is already set); "stop now" is the supervisor's job.
* Under ``ftrain launch`` (``$FTRAIN_ATTEMPT_DIR`` set), also:
  heartbeats for the hang detector, an error file on an uncaught exception,
  Python stack dumps on SIGUSR2, and a watch on the parent process: if torchrun
  disappears, the worker treats it as a preemption and, failing that, exits
  after the grace period, so no worker outlives its job.

One per process, created by :class:`ftrain.Session`. The flag is set from
signal handlers and a watcher thread and read by the training thread; a bool
assignment is atomic under the GIL, which is all this needs.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType, TracebackType

from ftrain import envvars, exitcodes
from ftrain.attempt import EXITING, AttemptFiles, HeartbeatWriter, write_error_file

log = logging.getLogger("ftrain")

#: The hang detector sends this to ask a worker for its Python stacks.
STACK_DUMP_SIGNAL = signal.SIGUSR2


class Preempted(SystemExit):
    """Raised by ``Session.step`` after the preemption checkpoint is committed; exits with code 75."""

    def __init__(self, step: int) -> None:
        super().__init__(exitcodes.PREEMPTED)
        self.step = step


class Worker:
    def __init__(self, rank: int, signals: list[str], grace_seconds: float) -> None:
        self.rank = rank
        self.grace_seconds = grace_seconds
        self.preempt_reason: str | None = None
        self._install_signal_handlers(signals)
        attempt_dir = os.environ.get(envvars.ATTEMPT_DIR)
        self.attempt = AttemptFiles(attempt_dir) if attempt_dir else None
        self._heartbeat: HeartbeatWriter | None = None
        if self.attempt is not None:
            self._heartbeat = HeartbeatWriter(self.attempt.heartbeat(rank))
            self._stack_file = open(self.attempt.stacks(rank), "a")  # kept open: faulthandler writes to its fd
            faulthandler.register(STACK_DUMP_SIGNAL, file=self._stack_file, all_threads=True, chain=False)
            self._chain_excepthook()
            threading.Thread(target=self._watch_parent, name="ftrain-parent-watch", daemon=True).start()

    # ------------------------------------------------------------ preemption
    @property
    def preempt_requested(self) -> bool:
        return self.preempt_reason is not None

    def request_preemption(self, reason: str) -> None:
        if self.preempt_reason is None:
            self.preempt_reason = reason

    def _install_signal_handlers(self, names: list[str]) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("ftrain.Session created outside the main thread: preemption signals are not handled")
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_preemption(f"received {signal.Signals(signum).name}")

        for name in names:
            signal.signal(getattr(signal, name), handler)

    def write_preempted_marker(self, step: int) -> None:
        """Tell the supervisor the preemption checkpoint committed (one per node: local rank 0 writes it)."""
        if self.attempt is None or os.environ.get(envvars.LOCAL_RANK, "0") != "0":
            return
        tmp = self.attempt.preempted.with_name("preempted.json.partial")
        tmp.write_text(json.dumps({"step": step, "rank": self.rank, "time": time.time(),
                                   "reason": self.preempt_reason}))
        os.replace(tmp, self.attempt.preempted)

    # ------------------------------------------------------------- liveness
    def beat(self, phase: str, step: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat(phase, step)

    def _watch_parent(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(1.0)
        # torchrun is gone (killed with its supervisor, or crashed): save if the other ranks can, then leave.
        self.request_preemption("parent process (torchrun) died")
        time.sleep(self.grace_seconds)
        self.beat(EXITING, -1)
        os._exit(exitcodes.PREEMPTED)

    def _chain_excepthook(self) -> None:
        previous = sys.excepthook
        attempt = self.attempt
        assert attempt is not None

        def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            try:
                write_error_file(attempt.error(self.rank), self.rank, value)
            except OSError:
                pass  # reporting must never mask the original error
            previous(etype, value, tb)
            # Leave now. Interpreter shutdown after a crash can take seconds (DataLoader worker joins,
            # process-group teardown against dead peers), and every second delays the restart; the
            # supervisor tears down whatever is left.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(exitcodes.FAILURE)

        sys.excepthook = hook

