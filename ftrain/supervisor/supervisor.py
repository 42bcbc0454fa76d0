"""The supervisor: an explicit state machine around torchrun, which restarts its worker groups itself. Its one loop
over a running torchrun is :func:`ftrain.supervisor.watch.watch`, in the mode of :mod:`ftrain.supervisor.groups`
(each worker group's end classified, and decided on by the policy).

::

    STARTING --> RUNNING --(exit 0)------------------------------> DONE (0)
                    |--(crash / hang)--> decide() --(restart after progress: torchrun restarts the group)--> RUNNING
                    |                       |--(no progress: kill torchrun)--> BACKOFF --> STARTING (new torchrun)
                    |                       `--> DONE (1, with a root-cause report)
                    `--(preemption signal)--> STOPPING --(workers saved and exited,
                                                          or grace ran out: kill)--> DONE (75)
                                                       `--(job finished anyway: exit 0)--> DONE (0)

A stop must reach workers that do not exist yet when the signal arrives (torchrun
takes seconds to spawn them, a multi-node rendezvous much longer): on STOPPING the
supervisor writes the attempt's ``stop.json`` first (workers read it: see
ftrain/session/liveness.py), then signals every worker at every poll that it has
not signalled yet. The grace period still counts from the signal.

(The legal transitions are :data:`ftrain.supervisor.state.TRANSITIONS`; any
other raises.) Every restart decision is :func:`ftrain.supervisor.policy.decide`,
a pure function. This module only observes the job and its files and carries
decisions out. It reaches the outside world only through three seams: the
:class:`~ftrain.supervisor.job.Job` a factory starts (real torchrun by default),
a :class:`~ftrain.supervisor.clock.Clock` (the real clocks by default), and
:meth:`Supervisor.notify`, which its signal handlers call, so the loop can be
unit-tested with a scripted job, fake time and injected signals. Preemption
notices (cloud metadata, the drain file: :mod:`ftrain.supervisor.notices`) come
from watcher threads started by :meth:`Supervisor.run` and stopped on every exit
path; a notice stops the job like a signal, as a :class:`~ftrain.supervisor.stop.StopRequest`
of kind NOTICE, which never counts as the second, "stop now" signal (the platform's
own SIGTERM usually follows a notice).

Whatever happens (including an exception here), the ``finally`` tears the
job's process tree down; if this process is SIGKILLed, torchrun gets SIGTERM
from the kernel (PR_SET_PDEATHSIG, SIGKILL) and its workers, watching their parent, save and exit.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from ftrain import exitcodes
from ftrain.attempt import AttemptFiles, PreemptedRecord
from ftrain.checkpoint.store import CheckpointStore
from ftrain.signals import STACK_DUMP_SIGNAL
from ftrain.supervisor import command
from ftrain.supervisor.clock import SYSTEM_CLOCK, Clock
from ftrain.supervisor.command import LaunchSpec
from ftrain.supervisor.console import Console, flush, strip_prefix  # noqa: F401 (strip_prefix: still importable here)
from ftrain.supervisor.groups import run_launch
from ftrain.supervisor.hang import HangLimits, reports_progress
from ftrain.supervisor.job import Job, JobFactory, JobProcess
from ftrain.supervisor.journal import Journal
from ftrain.supervisor.notices import Notice, NoticeWatch, announce, build_watch, deadline_report
from ftrain.supervisor.policy import RestartPolicy
from ftrain.supervisor.report import Failure, format_report
from ftrain.supervisor.state import INITIAL, State, check_transition
from ftrain.supervisor.stop import StopKind, StopRequest
from ftrain.supervisor.watch import POLL
from ftrain.supervisor.zygote import SOCKET_DIR_PREFIX, SOCKET_NAME, Zygote, sweep_stale

log = logging.getLogger("ftrain.launch")

#: The longest wait for the stacks of a hung job, and how long without a new one ends it early (dump_stacks).
_STACKS_WAIT = 2.0
_STACKS_SETTLE = 0.3


class Supervisor:
    """Runs one job to completion: restarts after crashes and hangs, stops cleanly on preemption.

    ``start_job`` starts each attempt's job (default: real torchrun, :class:`JobProcess`);
    ``clock`` supplies every reading of time and every wait (default: the real clocks);
    ``jitter`` supplies the policy's backoff jitter in [0, 1] (default: :func:`random.random`);
    ``notices`` watches for preemption notices (default: the sources of ``supervisor.notices.sources``).
    Signals reach the loop only through :meth:`notify`. One supervisor runs :meth:`run` once.
    """

    def __init__(self, spec: LaunchSpec, *, echo: bool = True, early_stops: list[StopRequest] | None = None,
                 start_job: JobFactory = JobProcess, clock: Clock = SYSTEM_CLOCK,
                 jitter: Callable[[], float] = random.random,
                 lease_lost: Callable[[], str | None] = lambda: None, notices: NoticeWatch | None = None) -> None:
        self.spec = spec
        cfg = spec.config
        self.sup = cfg.supervisor
        self.policy = RestartPolicy.from_config(self.sup)
        self.store = CheckpointStore(cfg.checkpoint.dir)
        self.log_dir = Path(cfg.log_dir)
        self.limits = HangLimits(hang_timeout=self.sup.hang_timeout_seconds,
                                 startup_timeout=self.sup.startup_timeout_seconds,
                                 save_timeout=self.sup.hang_timeout_seconds + cfg.checkpoint.commit_timeout_seconds,
                                 exit_timeout=self.sup.grace_seconds)
        self.state = INITIAL
        self.echo = echo
        self._start_job = start_job
        self.clock = clock
        self.jitter = jitter
        #: Why this job no longer owns the checkpoint root (another job took it over), or None.
        self.lease_lost = lease_lost
        # Signals received before run() (see cli.launch: the list is shared, so one that arrives until run()
        # installs our handlers is kept too) count as if they arrived now. Only ever appended to (by notify and
        # the notice watchers), never cleared: the first is what stopped us, a second signal means "stop now".
        self.stops: list[StopRequest] = early_stops if early_stops is not None else []
        self.job: Job | None = None
        nc = self.sup.notices
        self._notices = notices if notices is not None else build_watch(
            nc.sources, interval=nc.poll_seconds, aws_url=nc.aws_metadata_url, gcp_url=nc.gcp_metadata_url,
            azure_url=nc.azure_metadata_url, rebalance_stops=nc.aws_rebalance == "stop", clock=clock.time,
            drain_file=Path(nc.drain_file or os.path.join(cfg.checkpoint.dir, "DRAIN")))
        #: The first notice received (it carries the deadline), and the final save's preempted.json once seen.
        self.notice: Notice | None = None
        self._final: PreemptedRecord | None = None
        #: The run's event log (docs/FORMAT.md, "Event log") and the console's progress line.
        self.journal = Journal(cfg, spec.run_id, self.say, clock.monotonic)
        #: Warm starts (supervisor.warm_start): the zygote workers are forked from, while it runs.
        self.zygote: Zygote | None = None
        self._cold = False  # the zygote could not start: cold starts for the rest of the launch
        #: Whether the workers report through ftrain.Session (heartbeats): from the script's imports, and True
        #: for good once any heartbeat arrives (hang.reports_progress).
        self.reports = reports_progress(spec.script)

    def expected_reports(self, beats: Mapping[int, object]) -> int:
        """How many local ranks the hang detector expects heartbeats from: none for a script that never reports."""
        if beats:
            self.reports = True
        return self.spec.nproc if self.reports else 0

    # ------------------------------------------------------------------ public
    def run(self) -> int:
        """Supervise attempts until one succeeds, the policy gives up, or a signal stops us; the exit code.

        On return (or an exception) no job of ours is left running, and ``state`` is DONE unless an
        exception escaped.
        """
        self._install_signal_handlers()
        self.journal.launch(nproc=self.spec.nproc, nnodes=self.spec.nnodes, script=self.spec.script,
                            cfg=self.spec.config)
        for stop in self.stops:  # arrived before run()
            if stop.kind is StopKind.SIGNAL:
                self.journal.signal(stop.name)
        try:
            drain = self._notices.drain_file()
            if drain is not None:  # an operator (or a preStop hook) asked this job not to run: start nothing
                self.set_state(State.DONE)
                self.say(f"drain file {drain} exists: not starting the job; remove it and relaunch to resume from "
                         f"{'step ' + str(n) if (n := self.newest_step()) is not None else 'the start'}; "
                         f"exiting with code {exitcodes.PREEMPTED}")
                self.journal.finish(exitcodes.PREEMPTED, f"drain file {drain} exists")
                return exitcodes.PREEMPTED
            self._notices.start(self._on_notice)
            try:
                return run_launch(self)
            finally:
                try:
                    if self.job is not None and self.job.poll() is None:
                        self.job.kill_tree(graceful=0.0 if self.spec.multinode else 2.0)
                finally:
                    try:
                        if self.zygote is not None:  # after the job: it kills whatever workers it still has
                            self._stop_zygote()
                    finally:
                        self._notices.stop()
        finally:
            self.journal.close()

    def write_stop(self, files: AttemptFiles) -> str:
        """Leave the stop marker for workers that start later; "" or, if it could not be written, a note why."""
        try:
            files.write_stop(self.stops[0].name, self.clock.time())
        except OSError as e:
            # Workers already running still get the signal; only late starters depend on the marker.
            return f" (could not write the stop marker {files.stop}: {e.strerror or e})"
        return ""

    def dump_stacks(self, job: Job, files: AttemptFiles) -> None:
        """Ask every worker for its Python stacks, and wait until they are written (before a kill).

        faulthandler writes from a C signal handler, within milliseconds even in a rank blocked in a collective;
        the wait ends once every stack file grew, or none grew for :data:`_STACKS_SETTLE` seconds after one did (a
        rank that cannot answer: SIGSTOPped, in uninterruptible sleep), and after :data:`_STACKS_WAIT` at most.
        """
        before = files.stack_sizes()
        job.signal_workers(int(getattr(signal, STACK_DUMP_SIGNAL)))
        clock = self.clock
        deadline = clock.monotonic() + _STACKS_WAIT
        last_growth: float | None = None
        grown: set[str] = set()
        while clock.monotonic() < deadline:
            now = files.stack_sizes()
            new = {name for name, size in now.items() if size > before.get(name, 0)} - grown
            if new:
                grown |= new
                last_growth = clock.monotonic()
            if grown and (grown >= set(now) or clock.monotonic() - (last_growth or 0.0) >= _STACKS_SETTLE):
                return
            clock.sleep(0.05)

    # ------------------------------------------------------------ warm starts
    def warm(self) -> Zygote | None:
        """The zygote to fork this attempt's workers from, started (or restarted, if it died) now; None when warm
        starts are off or it cannot start (then workers start cold; said once). Called before each torchrun."""
        if not self.sup.warm_start or self._cold:
            return None
        if self.zygote is not None and self.zygote.alive():
            return self.zygote
        if self.zygote is not None:
            self.say("the zygote (warm starts) died: starting a new one")
            self._stop_zygote()
        host_dir = self.log_dir / self.spec.run_id / socket.gethostname()
        try:
            host_dir.mkdir(parents=True, exist_ok=True)
            sweep_stale(tempfile.gettempdir())  # what SIGKILLed launches left behind
            private = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX))  # the socket: a short path, only ours
            with open(host_dir / "zygote.log", "ab") as log_file:
                log_file.write(f"[ftrain launch] zygote socket directory {private} (removed at the end)\n".encode())
                log_file.flush()
                self.zygote = Zygote.start(private / SOCKET_NAME, self.sup.preload, script=os.path.abspath(
                    self.spec.script), env=self._base_env(), stderr=log_file)
        except OSError as e:
            self._cold = True
            self.say(f"warm starts off: could not start the zygote ({e}); workers start cold")
            return None
        return self.zygote

    def _stop_zygote(self) -> None:
        assert self.zygote is not None
        try:
            self.zygote.stop()
        finally:
            shutil.rmtree(self.zygote.socket_path.parent, ignore_errors=True)  # the private directory warm() made
            self.zygote = None

    # ----------------------------------------------------------- environment
    def start_job(self, files: AttemptFiles, number: int, console: Console | None) -> Job:
        """Start torchrun for the attempt directory ``files`` (attempt ``number``), warm if the zygote is up (it
        is started, or restarted, now): the job, also kept as ``self.job`` for the teardown on every exit path."""
        zygote = self.warm()
        self.job = self._start_job(self._command(files), self._env(files, number), files.torchrun_log, echo=console,
                                   warm=zygote.workers if zygote is not None else None)
        return self.job

    def _command(self, files: AttemptFiles) -> list[str]:
        return command.torchrun_command(self.spec, files, warm=self.zygote is not None)

    def _base_env(self) -> dict[str, str]:
        return command.base_env(self.spec)

    def _env(self, files: AttemptFiles, attempt: int) -> dict[str, str]:
        return command.worker_env(self.spec, files, attempt, self.zygote.env() if self.zygote is not None else {})

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.notify(signal.Signals(signum).name)

        for name in {*self.sup.preemption_signals, "SIGINT"}:
            signal.signal(getattr(signal, name), handler)

    def notify(self, signame: str) -> None:
        """Record that signal ``signame`` (e.g. "SIGTERM") arrived; the loop acts on it at its next poll.

        Called from the signal handlers (so it only appends: safe in a handler, and list.append is atomic)
        and by tests to inject signals without sending real ones.
        """
        self.stops.append(StopRequest.signal(signame))
        self.journal.signal(signame)

    def _on_notice(self, notice: Notice) -> None:
        """A watcher thread's notice: log it with its deadline, then stop as for a signal (see :meth:`notify`)."""
        if self.notice is None:
            self.notice = notice
        self.journal.notice(notice)
        self.say(announce(notice, self.clock.time(), self.sup.grace_seconds))
        self.stops.append(StopRequest.notice(notice.name))

    def see_final(self, marker: PreemptedRecord | None) -> None:
        """The final save's preempted.json (None: not yet): once seen after a notice, acknowledge the notice."""
        if marker is not None and self._final is None:
            self._final = marker
            if self.notice is not None:
                self._notices.acknowledge()  # e.g. Azure's StartRequests: the machine may go now

    def stop_now(self) -> bool:
        """A second preemption signal arrived ("stop now"); notices are not signals and never count."""
        return sum(1 for s in self.stops if s.kind is StopKind.SIGNAL) >= 2

    def forward_signal(self) -> int:
        """The signal the workers get: the one that stopped us if it is one of ``supervisor.preemption_signals``
        (which the workers handle), else (SIGINT, by default, or a notice) the first of them."""
        first = self.stops[0]
        handled = first.kind is StopKind.SIGNAL and first.name in self.sup.preemption_signals
        name = first.name if handled else self.sup.preemption_signals[0]
        return int(getattr(signal, name))

    def backoff_sleep(self, seconds: float) -> bool:
        """Back off; True if a signal arrived meanwhile (then do not restart)."""
        clock = self.clock
        deadline = clock.monotonic() + seconds
        while clock.monotonic() < deadline:
            if self.stops:
                return True
            clock.sleep(min(POLL, max(0.0, deadline - clock.monotonic())))
        return bool(self.stops)

    # ---------------------------------------------------------------- output
    def finish(self, code: int, reason: str, failures: list[Failure], lines: list[str], newest: int | None) -> int:
        self.journal.finish(code, reason)
        if code == exitcodes.OK:
            late = (f" (the job finished before the stop ({self.stops[0].name}) took effect: nothing to resume)"
                    if self.stops else "")
            self.say(f"finished: {reason}{late}")
        elif code == exitcodes.PREEMPTED:
            if self.notice is not None:
                self.say(deadline_report(self.notice, self._final, newest))
            self.say(f"preempted ({reason}); exiting with code {code}. Relaunch the same command to resume from "
                     f"{'step ' + str(newest) if newest is not None else 'the start'}")
        else:
            print(format_report(reason, failures, lines, str(self.log_dir / self.spec.run_id), newest),
                  file=sys.stderr, flush=True)
        return code

    def newest_step(self) -> int | None:
        steps = self.store.steps()
        return steps[-1] if steps else None

    def set_state(self, state: State) -> None:
        """Enter ``state``; an illegal transition (see ftrain.supervisor.state) raises IllegalTransition."""
        check_transition(self.state, state)
        self.state = state
        log.debug("supervisor state: %s", state.value)

    def say(self, msg: str) -> None:
        print(f"[ftrain launch] {msg}", file=sys.stderr, flush=True)


__all__ = ["LaunchSpec", "State", "Supervisor"]
