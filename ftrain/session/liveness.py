"""Worker side: what a training process does for fault tolerance besides checkpoints.

* **Preemption flag.** The configured signals (``supervisor.preemption_signals``)
  only set a flag: saving inside a signal handler is unsafe (Lightning learned
  this). ``Session.step`` reads the flag at the next step boundary, all ranks
  agree, save once and exit with ``exitcodes.PREEMPTED``. Repeated signals are
  harmless (the flag is already set); "stop now" is the supervisor's job.
* **Stop marker.** Under ``ftrain launch`` the flag is also set once the
  supervisor's ``stop.json`` exists in the attempt directory. A signal can only
  reach a process that exists and handles it; the marker also reaches a worker
  that started after the stop (torchrun still spawning it, a rank still in
  rendezvous or importing torch). It is looked for at most every
  ``STOP_CHECK_INTERVAL`` seconds when the flag is read (one failed ``open``),
  and always when the worker enters the ``step`` phase (the end of ``restore``),
  so it saves at its first step.
* **Crash flag.** An uncaught exception marks the process as crashing, so the
  session's exit hook does not wait for a commit that dead peers will never join.
* Under ``ftrain launch`` (``$FTRAIN_ATTEMPT_DIR`` set), also:
  heartbeats for the hang detector, an error file on an uncaught exception,
  Python stack dumps on the stack-dump signal, and a watch on the parent process: if torchrun
  disappears, the worker treats it as a preemption and, failing that, exits
  after the grace period, so no worker outlives its job. (A warm worker, forked by the zygote, watches the
  zygote and its entry's parent instead: see :func:`_parents`.) The files are the
  attempt-directory contract (docs/FORMAT.md, "Attempt directory").

Every process-global hook (signal handlers, ``sys.excepthook``, faulthandler,
the watcher thread) is undone by :meth:`Liveness.close`, so a second session in
the same process starts clean. The flags are set from signal handlers and a
watcher thread and read by the training thread; a bool or str assignment is
atomic under the GIL, which is all this needs.
"""
from __future__ import annotations

import faulthandler
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import IO, Any, ParamSpec, TypeVar

from ftrain import envvars, exitcodes
from ftrain.attempt import (
    EXITING,
    STEPPING,
    AttemptFiles,
    HeartbeatWriter,
    PreemptedRecord,
    entry_pid,
    exit_code_of,
    worker_pid,
    write_error_file,
)
from ftrain.errors import FtrainError
from ftrain.signals import STACK_DUMP_SIGNAL

log = logging.getLogger("ftrain")
P = ParamSpec("P")
R = TypeVar("R")

#: Seconds between looks for the stop marker while the flag is read (``Session.step``): a step
#: then costs one clock read, and a stop is seen within this much of the step it falls in.
STOP_CHECK_INTERVAL = 0.2


class Preempted(SystemExit):
    """Raised by ``Session.step`` after the preemption checkpoint is committed; exits with code 75."""

    def __init__(self, step: int) -> None:
        super().__init__(exitcodes.PREEMPTED)
        self.step = step


class Liveness:
    """The process-level side of one session: signals, heartbeats, crash reporting, the parent watch."""

    def __init__(self, rank: int, signals: list[str], grace_seconds: float) -> None:
        self.rank = rank
        self.grace_seconds = grace_seconds
        self.preempt_reason: str | None = None
        #: When the stop became known here (time.monotonic()), for the grace left to the final upload.
        self.preempt_at: float | None = None
        self.crashing = False
        self._closed = threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_handlers(signals)
        attempt_dir = os.environ.get(envvars.ATTEMPT_DIR)
        self.attempt = AttemptFiles(attempt_dir) if attempt_dir else None
        #: This process's worker group (docs/FORMAT.md, "Attempt directory"): torchrun restarts workers under new
        #: ranks, so the supervisor tells their files apart by group and pid.
        self.group = _int_env(envvars.RESTART_COUNT)
        self._next_stop_check = 0.0  # the first read of the flag looks at once
        self._phase = ""
        self._heartbeat: HeartbeatWriter | None = None
        self._stack_file: IO[str] | None = None
        if self.attempt is not None:
            self._heartbeat = HeartbeatWriter(self.attempt.heartbeat(rank), self.group)
            # Kept open until close(): faulthandler writes to its fd from a signal handler.
            self._stack_file = open(self.attempt.stacks(rank), "a")  # noqa: SIM115
            faulthandler.register(getattr(signal, STACK_DUMP_SIGNAL), file=self._stack_file, all_threads=True,
                                  chain=False)
            threading.Thread(target=self._watch_parent, name="ftrain-parent-watch", daemon=True).start()
        #: Called (with no arguments) right before this module ends the process with os._exit: flush logs.
        self.before_exit: Callable[[], object] = lambda: None
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook

    # ------------------------------------------------------------ preemption
    @property
    def preempt_requested(self) -> bool:
        """Whether this process must save and exit: a preemption signal, a dead parent, or the stop marker."""
        if self.preempt_reason is None and self.attempt is not None:
            now = time.monotonic()
            if now >= self._next_stop_check:
                self._next_stop_check = now + STOP_CHECK_INTERVAL
                self.check_stop_marker()
        return self.preempt_reason is not None

    def check_stop_marker(self) -> bool:
        """Look for the supervisor's stop marker now (unthrottled); True if it is there (the flag is then set).

        Never looks outside ``ftrain launch`` (no attempt directory).
        """
        if self.attempt is None:
            return False
        record = self.attempt.read_stop()
        if record is None:
            return False
        self.request_preemption(f"ftrain launch was stopped by {record.signal or 'a signal'} (stop marker)")
        return True

    def request_preemption(self, reason: str) -> None:
        if self.preempt_reason is None:
            self.preempt_reason = reason
            self.preempt_at = time.monotonic()

    def grace_left(self) -> float:
        """Seconds left of ``supervisor.grace_seconds`` since this process learned of the stop (the whole grace
        period if it has not)."""
        at = self.preempt_at
        return self.grace_seconds if at is None else max(0.0, self.grace_seconds - (time.monotonic() - at))

    def _install_signal_handlers(self, names: list[str]) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("ftrain.Session created outside the main thread: preemption signals are not handled")
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_preemption(f"received {signal.Signals(signum).name}")

        for name in names:
            sig = getattr(signal, name)
            self._previous_handlers[sig] = signal.signal(sig, handler)

    def write_preempted_marker(self, step: int, remote_time: float | None = None) -> None:
        """Tell the supervisor the preemption checkpoint committed (one per node: local rank 0 writes it);
        ``remote_time``: when it became durable on the remote tier (rank 0 knows)."""
        if self.attempt is None or os.environ.get(envvars.LOCAL_RANK, "0") != "0":
            return
        self.attempt.write_preempted(PreemptedRecord(step, rank=self.rank, time=time.time(), reason=self.preempt_reason,
                                                     pid=worker_pid(), group=self.group, remote_time=remote_time))

    # ------------------------------------------------------------- liveness
    def beat(self, phase: str, step: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat(phase, step)
        if phase != self._phase:
            self._phase = phase
            if phase == STEPPING and self.preempt_reason is None:
                # Entering the step loop (restore done, or a save done): a stop that arrived while this
                # worker was starting or restoring takes effect at its very next step.
                self.check_stop_marker()

    def _watch_parent(self) -> None:
        parents = _parents()
        while _parents() == parents:
            if self._closed.wait(1.0):
                return
        # torchrun is gone (killed with its supervisor, or crashed): save if the other ranks can, then leave.
        self.request_preemption("parent process (torchrun) died")
        if self._closed.wait(self.grace_seconds):
            return
        self.beat(EXITING, -1)
        self.before_exit()
        os._exit(exitcodes.PREEMPTED)

    # --------------------------------------------------------------- crashes
    def _excepthook(self, etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if self._closed.is_set():  # closed, but another hook was chained over ours: only pass it on
            self._previous_hook(etype, value, tb)
            return
        self.crashing = True
        if self.attempt is not None:
            try:
                write_error_file(self.attempt.error(self.rank), self.rank, value, self.group)
            except OSError:
                pass  # reporting must never mask the original error
        self._previous_hook(etype, value, tb)
        if self.attempt is not None:
            # Leave now. Interpreter shutdown after a crash can take seconds (DataLoader worker joins,
            # process-group teardown against dead peers), and every second delays the restart; the
            # supervisor tears down whatever is left.
            _flush_std()
            self.before_exit()
            os._exit(exit_code_of(value))

    # ----------------------------------------------------------------- close
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (the session's ``close()`` closes liveness last)."""
        return self._closed.is_set()

    def close(self) -> None:
        """Undo every process-global hook; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous_handlers.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook
        if self._stack_file is not None:
            faulthandler.unregister(getattr(signal, STACK_DUMP_SIGNAL))
            self._stack_file.close()
            self._stack_file = None
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None


def record_mistake(exc: FtrainError) -> None:
    """Under ``ftrain launch``, leave a permanent error (``exc.permanent``) in the attempt's error files the moment
    ftrain raises it, not only when it goes uncaught: a script that catches ``FtrainError``, prints it and exits
    with its code (as examples/train.py does) must still stop the launch at once instead of being restarted."""
    attempt_dir = os.environ.get(envvars.ATTEMPT_DIR)
    if attempt_dir and exc.permanent:
        rank = _int_env(envvars.RANK)
        try:
            write_error_file(AttemptFiles(attempt_dir).error(rank), rank, exc, _int_env(envvars.RESTART_COUNT))
        except OSError:
            pass  # reporting must never mask the original error


def reports_mistakes(method: Callable[P, R]) -> Callable[P, R]:
    """Decorates the public API: a permanent error raised through it is recorded (:func:`record_mistake`)."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except FtrainError as e:
            record_mistake(e)
            raise
    return wrapper


def setup_logging(rank: int) -> None:
    """``[ftrain rN] LEVEL message`` on stderr, unless the host program configured logging itself."""
    logger = logging.getLogger("ftrain")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[ftrain r{rank}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False


def _parents() -> tuple[int, int | None]:
    """What the parent watch compares: this process's parent, and in a warm worker its entry's parent.

    A cold worker's parent is torchrun. A warm worker's parent is the zygote (which dies with the supervisor, as
    torchrun does) and torchrun is its entry's parent: either one changing means the job is gone, and the worker
    saves and leaves exactly as a cold worker whose torchrun died. The entry itself dying needs no watch: the
    zygote kills the worker then (docs/FORMAT.md, "Warm starts (zygote)").
    """
    entry = entry_pid()
    if entry is None:
        return os.getppid(), None
    try:
        with open(f"/proc/{entry}/stat") as f:
            return os.getppid(), int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return os.getppid(), -1  # the entry is gone (or /proc unreadable: then nothing ever changes)


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
