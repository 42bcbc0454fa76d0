"""Single-node launches: one torchrun per attempt, restarted by the supervisor (its policy decides).

:func:`run_single` is the attempts loop: start an attempt, watch it (:func:`ftrain.supervisor.watch.watch` with
:class:`AttemptWatch`), classify how it ended (:func:`classify`), ask :func:`ftrain.supervisor.policy.decide`,
back off (only after failures in a row that made no progress) and start the next one. Each attempt has its own
attempt directory and a fresh torchrun; with warm starts torchrun and its workers are forked from the launch's
zygote, so a restart costs forks, not imports.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ftrain import exitcodes
from ftrain.attempt import AttemptFiles
from ftrain.supervisor.console import Console, flush
from ftrain.supervisor.hang import find_hung
from ftrain.supervisor.policy import Action, AttemptResult, Outcome, decide
from ftrain.supervisor.report import Failure, permanent_failure, root_cause, torchrun_reported_failure
from ftrain.supervisor.state import State
from ftrain.supervisor.watch import watch

if TYPE_CHECKING:
    from ftrain.supervisor.job import Job
    from ftrain.supervisor.supervisor import Supervisor

#: Seconds between hang checks (reads of the heartbeat files): a hang's detection is late by at most this.
HANG_CHECK = 0.25


def run_single(sup: Supervisor) -> int:
    """Supervise attempts until one succeeds, the policy gives up, or a signal stops us; the exit code."""
    history: list[AttemptResult] = []
    failures: list[Failure] = []
    lines: list[str] = []
    while True:
        if sup.signals and sup.job is None and not history:
            sup.set_state(State.DONE)
            return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.signals[0]} before the job started",
                              failures, lines, sup.newest_step())
        attempt = len(history)
        before = sup.newest_step()
        result, failure = run_attempt(sup, attempt)
        after = sup.newest_step()
        # A script that never reports has no ftrain checkpoints to judge by: max_restarts alone limits it.
        progressed = (after is not None and (before is None or after > before)) or not sup.reports
        result = dataclasses.replace(result, new_checkpoint=progressed)
        history.append(result)
        if failure:
            failures.append(failure)
        sup.journal.attempt_end(result, failure, after)
        lines.append(f"#{attempt} {result.outcome.value}: {result.detail}; newest checkpoint: "
                     f"{'step ' + str(after) if after is not None else 'none'}")
        decision = decide(history, sup.policy, sup.jitter())
        lost = sup.lease_lost() if decision.action is Action.RESTART else None
        if lost is not None:  # restarting would only be refused at the lease, attempt after attempt
            sup.set_state(State.DONE)
            return sup.finish(exitcodes.FAILURE, f"not restarting: {lost}", failures, lines, after)
        if decision.action is Action.STOP:
            sup.set_state(State.DONE)
            return sup.finish(decision.exit_code, decision.reason, failures, lines, after)
        when = f"in {decision.delay:.1f}s" if decision.delay > 0 else "at once (it made progress)"
        sup.say(f"attempt {attempt} {result.outcome.value} ({result.detail}); restarting {when} from the "
                "newest valid checkpoint")
        sup.set_state(State.BACKOFF)
        sup.journal.backoff(attempt, decision.delay)
        if sup.backoff_sleep(decision.delay):
            sup.set_state(State.DONE)
            return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.signals[0]} while waiting to restart",
                              failures, lines, after)
        sup.set_state(State.STARTING)


def run_attempt(sup: Supervisor, attempt: int) -> tuple[AttemptResult, Failure | None]:
    """Start one attempt's job and watch it until it ends; how it ended (its outcome's checkpoint flag unset).

    Entered in STARTING; leaves RUNNING or STOPPING, and no job running (``sup.job`` None).
    """
    number, files = AttemptFiles.next_attempt(sup.log_dir, sup.spec.run_id)
    files.create()
    console = Console(files.torchrun_log, mistakes=files.mistakes) if sup.echo else None
    job = sup.start_job(files, number, console)
    sup.say(f"attempt {attempt}: started torchrun (pid {job.pid}) with {sup.spec.nproc} worker(s) per node; "
            f"logs in {files.root}")
    sup.journal.attempt_start(attempt, number, files, job.pid)
    sup.set_state(State.RUNNING)
    mode = AttemptWatch(sup, job, files, attempt)
    watch(sup, job, files, mode)
    rc = job.poll()
    job.kill_tree()  # workers or their DataLoader children may linger after torchrun exits
    job.close()
    flush(console, sup.say)  # the attempt's folded tracebacks, before the supervisor says how it ended
    sup.job = None
    return classify(sup, attempt, files, job, rc, mode.hang)


class AttemptWatch:
    """The single-node :class:`~ftrain.supervisor.watch.Mode`: the watch ends with torchrun, as soon as torchrun
    reported a failed worker, at a hang (stacks dumped, job killed), or once every worker saved after a stop."""

    checks_exit = False

    def __init__(self, sup: Supervisor, job: Job, files: AttemptFiles, attempt: int) -> None:
        self.sup, self.job, self.files, self.attempt = sup, job, files, attempt
        self.started = sup.clock.time()
        self.next_hang_check = sup.clock.monotonic() + HANG_CHECK
        #: The hang verdict that ended the attempt, if one did.
        self.hang: str | None = None

    def stop_requested(self, asked: int, note: str) -> bool:
        sup = self.sup
        later = (f"; the {sup.spec.nproc - asked} not started (or not ready) yet are asked once they are"
                 if asked < sup.spec.nproc else "")
        sup.say(f"{sup.signals[0]}: asked {asked} worker(s) to save and exit within {sup.sup.grace_seconds:g}s"
                f"{later}{note}")
        return False

    def while_stopping(self, asked: int) -> bool:
        sup = self.sup
        if asked:
            sup.say(f"asked {asked} more worker(s), started after the stop, to save and exit")
        marker = self.files.read_preempted()
        sup.see_final(marker if sup.notice is not None else None)
        # Every worker saved and left: torchrun has nothing left to do but its own exit, which takes it about a
        # second (interpreter teardown with torch loaded); the relaunch need not wait.
        return marker is not None and not self.job.worker_pids()

    def check(self, rc: int | None, stopping: bool) -> bool:
        if stopping:
            return False
        if torchrun_reported_failure(list(self.job.tail)):
            # torchrun has stopped every worker and printed why (what the root cause reads); all it has left is
            # its own exit: the rendezvous' shutdown and the teardown of an interpreter with torch loaded, 0.6-0.7 s
            # here, that the next attempt need not wait for. (exit code None: killed, as a hang)
            return True
        sup, clock = self.sup, self.sup.clock
        if clock.monotonic() < self.next_hang_check:
            return False
        self.next_hang_check = clock.monotonic() + HANG_CHECK
        self.job.tree()  # remember every descendant, so they can be killed even if torchrun dies first
        beats = self.files.read_heartbeats()
        hang = find_hung(beats, sup.expected_reports(beats), self.started, clock.time(), sup.limits)
        if not hang:
            return False
        sup.journal.hang(self.attempt, hang, self.files)
        sup.say(f"hang detected: {hang}; dumping Python stacks of every rank to {self.files.root / 'stacks'}")
        sup.dump_stacks(self.job, self.files)
        self.job.kill_tree()
        self.hang = hang
        return True


def classify(sup: Supervisor, attempt: int, files: AttemptFiles, job: Job, rc: int | None,
             hang: str | None) -> tuple[AttemptResult, Failure | None]:
    """How an ended attempt ended, from its files, its output, its exit code and the hang verdict.

    Precedence, first match wins: a preempted.json marker (the final save committed); exit code 0
    (every rank finished, even if a signal arrived first: there is nothing left to resume); any
    signal received (preempted without a final save); a permanent error in an error file; a hang; else a
    failure whose root cause comes from the error files and torchrun's output. ``new_checkpoint`` is left
    False: the caller knows the checkpoints from before the attempt.
    """
    marker = files.read_preempted()
    sup.see_final(marker)
    if marker is not None:
        return AttemptResult(attempt, Outcome.PREEMPTED, False, rc,
                             f"final checkpoint at step {marker.get('step')}"), None
    if rc == 0 and hang is None:
        detail = (f"all ranks finished before the stop ({sup.signals[0]}) took effect" if sup.signals
                  else "all ranks finished")
        return AttemptResult(attempt, Outcome.SUCCEEDED, False, rc, detail), None
    if sup.signals:
        return AttemptResult(attempt, Outcome.PREEMPTED, False, rc,
                             f"stopped by {sup.signals[0]} before a final checkpoint committed"), None
    errors = files.read_errors()
    permanent = permanent_failure(attempt, errors)
    if permanent is not None:  # a mistake: the policy stops at once, with its exit code
        return AttemptResult(attempt, Outcome.FAILED, False, rc, f"{permanent.exc_type}: {permanent.message}",
                             permanent.permanent), permanent
    if hang:
        failure = root_cause(attempt, list(job.tail), errors, hang, files.ranks_dir)
        return AttemptResult(attempt, Outcome.HUNG, False, rc, failure.describe()), failure
    failure = root_cause(attempt, list(job.tail), errors, None, files.ranks_dir)
    if failure.rank is None and failure.exit_code is None and rc is not None:
        failure.exit_code = rc
    return AttemptResult(attempt, Outcome.FAILED, False, rc, failure.describe()), failure
