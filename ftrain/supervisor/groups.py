"""Every launch, single- or multi-node: one long-lived torchrun that restarts its worker groups itself, watched by
the supervisor's one loop (:func:`ftrain.supervisor.watch.watch`) in the :class:`GroupsWatch` mode.

torchrun runs with unlimited ``--max-restarts`` (:data:`~ftrain.supervisor.command.TORCHRUN_RESTARTS`): when a
worker fails it stops the group and starts the next one at once, inside the same agent, with no new torchrun, no
new store and (warm) workers forked from the launch's zygote. On several nodes it also re-rendezvouses when a
node leaves or joins (an agent that exhausts its restarts would close the rendezvous for every node). Our policy
still decides: the supervisor sees each worker group as the set of torchrun's worker pids
(:class:`~ftrain.supervisor.membership.GroupWatch`), classifies why each one ended
(:func:`~ftrain.supervisor.membership.classify_group`, pure), counts local failures and hangs in the policy's
history (:func:`~ftrain.supervisor.policy.decide`, pure; a membership change is not counted), and acts:

* the policy gives up (``max_restarts``, a crash loop, a permanent error, a checkpoint directory taken over): the
  torchrun tree is killed (SIGKILL: on several nodes torchrun then does not close the rendezvous, so the other
  nodes carry on without us) and we exit with the policy's code and the root-cause report;
* a restart after progress: nothing to do, torchrun has already started the next group (the first restart after
  progress is immediate);
* a restart after failures in a row that made no progress, on a single node: the backoff. torchrun is killed, we
  wait out the delay (BACKOFF) and start a new torchrun (a new attempt directory). On several nodes there is no
  backoff: the rendezvous is the wait, and leaving it would shrink the job.

A hang dumps the group's stacks and kills this node's workers (torchrun restarts the group). A stop (a
preemption signal or notice) asks the current group to save; once it ended (saved), torchrun goes too. A single
node waits for workers that start after the stop (torchrun was starting them); on several nodes a stop while no
group runs (torchrun is in a rendezvous, which may wait for other nodes) stops torchrun at once.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ftrain import exitcodes
from ftrain.attempt import AttemptFiles, PreemptedRecord
from ftrain.supervisor.console import Console, flush
from ftrain.supervisor.hang import find_hung
from ftrain.supervisor.membership import Ending, Group, GroupWatch, classify_group, group_errors, parse_worker_exits
from ftrain.supervisor.policy import Action, AttemptResult, Decision, Outcome, decide
from ftrain.supervisor.report import Failure, exit_text, permanent_failure, root_cause
from ftrain.supervisor.state import State
from ftrain.supervisor.watch import watch

if TYPE_CHECKING:
    from ftrain.supervisor.job import Job
    from ftrain.supervisor.supervisor import Supervisor

#: Seconds between looks at torchrun's workers (a psutil scan, and the hang check's read of the heartbeats): a
#: failure's classification and a hang's detection are late by at most this. Not the restart: torchrun restarts
#: the group by itself, 0.1 s (its ``--monitor-interval``) after a worker died.
GROUP_CHECK = 0.1
#: Seconds a worker group that ended without a trace (no error, no failed exit, no save) waits for torchrun to
#: exit (the workers finished) or to start the next group (a re-rendezvous) before it is reported anyway. Workers
#: that finish leave torchrun in its exit barrier until every node's workers finished: here (2 nodes on one host)
#: the whole finish, from the last step's line to torchrun's exit, took 2.5 s.
FINISH_WAIT = 5.0


@dataclass
class Tally:
    """What the policy saw in this launch, across torchruns: one history entry per local failure or hang."""

    history: list[AttemptResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    #: One line per ended group (and per torchrun that failed by itself), for the report.
    lines: list[str] = field(default_factory=list)
    #: The newest checkpoint at the previous local failure: a failure with none newer made no progress.
    mark: int | None = None
    #: The number the next worker group gets: groups are numbered across the launch's torchruns.
    groups: int = 0

    def progressed(self, newest: int | None, reports: bool) -> bool:
        """Whether a failure now made progress: a checkpoint newer than at the previous failure. A script that never
        reports has no ftrain checkpoints to judge by: every failure counts as progress, and max_restarts alone
        limits it."""
        return (newest is not None and (self.mark is None or newest > self.mark)) or not reports


def _torchrun_exit(tally: Tally, job: Job, rc: int | None) -> Failure:
    """The root cause of torchrun's own exit (outside a worker group), from its output and exit code."""
    failure = root_cause(len(tally.history), list(job.tail), {}, None, None)
    failure.exit_code = rc
    return failure


def _newest_text(newest: int | None) -> str:
    return f"step {newest}" if newest is not None else "none"


def run_launch(sup: Supervisor) -> int:
    """Supervise the launch until its workers finish, the policy gives up, or a stop; the exit code."""
    if sup.stops:
        sup.set_state(State.DONE)
        return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.stops[0].name} before the job started", [],
                          [], sup.newest_step())
    tally = Tally(mark=sup.newest_step())
    attempt = 0
    while True:
        mode, rc = _run_torchrun(sup, tally, attempt)
        if mode.stop is not None:  # the policy gave up
            sup.set_state(State.DONE)
            return sup.finish(mode.stop.exit_code, mode.stop.reason, tally.failures, tally.lines, sup.newest_step())
        restart = mode.backoff if not sup.stops else None  # a stopped job is never restarted by us
        if restart is None and not sup.stops and rc not in (0, None) and not sup.spec.multinode:
            restart = _torchrun_failed(sup, tally, mode, rc)  # torchrun itself died (killed, out of memory)
            if restart.action is Action.STOP:
                sup.set_state(State.DONE)
                return sup.finish(restart.exit_code, restart.reason, tally.failures, tally.lines,
                                  sup.newest_step())
        if restart is None:
            return _finished(sup, tally, mode, rc)
        sup.set_state(State.BACKOFF)
        sup.journal.backoff(attempt, restart.delay)
        if sup.backoff_sleep(restart.delay):
            sup.set_state(State.DONE)
            return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.stops[0].name} while waiting to restart",
                              tally.failures, tally.lines, sup.newest_step())
        sup.set_state(State.STARTING)
        attempt += 1


def _run_torchrun(sup: Supervisor, tally: Tally, attempt: int) -> tuple[GroupsWatch, int | None]:
    """Start one torchrun (attempt ``attempt``) and watch it until it ends or the mode ends the watch; the mode
    (what it decided) and torchrun's exit code. Entered in STARTING; leaves no torchrun running."""
    number, files = AttemptFiles.next_attempt(sup.log_dir, sup.spec.run_id)
    files.create()
    console = Console(files.torchrun_log, mistakes=files.mistakes) if sup.echo else None
    # One zygote for the launch: torchrun restarts its groups itself, forking from it each time.
    job = sup.start_job(files, number, console)
    lo, hi = sup.spec.nnodes
    nodes = f"for {lo}:{hi} node(s), " if sup.spec.multinode else ""
    sup.say(f"attempt {attempt}: started torchrun (pid {job.pid}) {nodes}with {sup.spec.nproc} worker(s) per node; "
            f"it restarts failed worker groups itself; logs in {files.root}")
    sup.journal.attempt_start(attempt, number, files, job.pid)
    sup.set_state(State.RUNNING)
    mode = GroupsWatch(sup, job, files, console, tally)
    watch(sup, job, files, mode)
    tally.groups = mode.groups.count
    rc = job.poll()
    job.kill_tree()  # workers or their DataLoader children may linger after torchrun exits
    job.close()
    flush(console, sup.say)
    if mode.pending is not None and mode.stop is None and mode.backoff is None:
        # torchrun exited (0: the ranks finished), or we stopped it
        mode.report(mode.pending[0], finished=True if rc == 0 else None if sup.stops else False)
    elif sup.stops and mode.groups.current is not None and mode.groups.current == mode.stopping and mode.stop is None:
        # The group the stop ended (it saved and left before a check saw it end): preempted, never counted. Not a
        # group torchrun had already started again in its place: that one is killed unseen.
        mode.report(mode.groups.current, finished=None)
    sup.job = None
    return mode, rc


def _torchrun_failed(sup: Supervisor, tally: Tally, mode: GroupsWatch, rc: int) -> Decision:
    """torchrun exited non-zero by itself on a single node (it never runs out of restarts: it was killed, or its
    agent failed): counted as a failure of its own, and decided on like a group's."""
    newest = sup.newest_step()
    progressed = tally.progressed(newest, sup.reports)
    failure = _torchrun_exit(tally, mode.job, rc)
    detail = f"torchrun exited with {exit_text(rc)} outside a worker group"
    tally.history.append(AttemptResult(len(tally.history), Outcome.FAILED, progressed, rc, detail))
    tally.failures.append(failure)
    tally.lines.append(f"torchrun {detail}; newest checkpoint: {_newest_text(newest)}")
    sup.journal.failure(len(tally.history) - 1, failure)
    tally.mark = newest
    decision = decide(tally.history, sup.policy, sup.jitter())
    if decision.action is Action.RESTART:
        lost = sup.lease_lost()
        if lost is not None:
            return Decision(Action.STOP, exitcodes.FAILURE, 0.0, f"not restarting: {lost}")
        sup.say(f"{detail}; starting a new one {_when(decision.delay)}")
    return decision


def _finished(sup: Supervisor, tally: Tally, mode: GroupsWatch, rc: int | None) -> int:
    """How the launch ended once torchrun did, without the policy giving up or a restart."""
    sup.set_state(State.DONE)
    newest = sup.newest_step()
    failures, lines = tally.failures, tally.lines
    if sup.stops:
        marker = _final_marker(mode.files, mode.stopping)
        sup.see_final(marker)
        saved = f"final checkpoint at step {marker.step}" if marker is not None else \
            "no final checkpoint committed"
        if rc == 0 and marker is None:
            return sup.finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
        return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.stops[0].name}: {saved}", failures, lines, newest)
    if rc == 0:
        return sup.finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
    failure = _torchrun_exit(tally, mode.job, rc)
    failures.append(failure)
    return sup.finish(exitcodes.FAILURE, f"torchrun exited with {exit_text(rc) if rc is not None else '?'} "
                      "outside a worker group (rendezvous closed or timed out, or the job already finished on "
                      "the other nodes: see its output above)", failures, lines, newest)


def _when(delay: float) -> str:
    return f"in {delay:.1f}s (no progress since the previous failure)" if delay > 0 else "at once (it made progress)"


class GroupsWatch:
    """The :class:`~ftrain.supervisor.watch.Mode` of every launch: torchrun's worker groups, each classified when it
    ends; a hang kills this node's workers (torchrun restarts them); the watch ends with torchrun, when the policy
    gives up (:attr:`stop`), or, on a single node, when it asks for a backoff first (:attr:`backoff`)."""

    checks_exit = True

    def __init__(self, sup: Supervisor, job: Job, files: AttemptFiles, console: Console | None,
                 tally: Tally) -> None:
        self.sup, self.job, self.files, self.console, self.tally = sup, job, files, console, tally
        self.groups = GroupWatch(tally.groups)
        self.hangs: dict[int, str] = {}  # group number -> the hang verdict that ended it
        self.stopping: Group | None = None  # the group running when the preemption signal came
        self.pending: tuple[Group, float] | None = None  # a group that ended without a trace, and until when
        self.next_check = sup.clock.monotonic()
        #: The policy's STOP decision, once it gave up.
        self.stop: Decision | None = None
        #: The policy's RESTART decision with a delay (single node): torchrun is stopped, and a new one started
        #: after the delay.
        self.backoff: Decision | None = None

    def stop_requested(self, asked: int, note: str) -> bool:
        sup = self.sup
        self.stopping = self.groups.current
        if not sup.spec.multinode:
            later = (f"; the {sup.spec.nproc - asked} not started (or not ready) yet are asked once they are"
                     if asked < sup.spec.nproc else "")
            sup.say(f"{sup.stops[0].name}: asked {asked} worker(s) to save and exit within "
                    f"{sup.sup.grace_seconds:g}s{later}{note}")
            return False
        sup.say(f"{sup.stops[0].name}: asked {asked} worker(s) of this node to save and exit within "
                f"{sup.sup.grace_seconds:g}s{note}")
        if self.groups.current is None:
            sup.say("no worker group is running (torchrun is in a rendezvous): stopping torchrun")
            return True
        return False

    def while_stopping(self, asked: int) -> bool:
        sup = self.sup
        if asked and not sup.spec.multinode:
            sup.say(f"asked {asked} more worker(s), started after the stop, to save and exit")
        marker = _final_marker(self.files, self.stopping)
        if sup.notice is not None:
            sup.see_final(marker)
        if self.stopping is None and self.groups.current is not None:
            self.stopping = self.groups.current  # the group that started after the stop: its save is the final one
        # Every worker saved and left (single node): torchrun would only restart them, or exit.
        return not sup.spec.multinode and marker is not None and not self.job.worker_pids()

    def check(self, rc: int | None, stopping: bool) -> bool:
        sup, job, clock = self.sup, self.job, self.sup.clock
        if rc is None and clock.monotonic() < self.next_check:
            return False
        self.next_check = clock.monotonic() + GROUP_CHECK
        job.tree()  # remember every descendant, so they can be killed even if torchrun dies first
        ended, started = self.groups.observe(job.worker_pids() if rc is None else (), clock.time())
        now = clock.monotonic()
        pending = self.pending
        resolve = pending is not None and (started is not None or ended is not None
                                           or (rc is None and now >= pending[1]))
        if ended is not None and rc is None and stopping:
            if _traceless(ended, self.files, job, None):
                # Finished before the stop took effect (no save, no error): torchrun's exit 0 says so, or it
                # restarts them (they were stopped), and then it goes (below).
                self.pending = (ended, now + FINISH_WAIT)
                return False
            self.report(ended, finished=None)  # preempted (the stop), never counted
            job.kill_tree()  # our group saved (or failed) after the stop: torchrun goes too
            return True
        reports: list[tuple[Group, bool | None]] = []  # (group, finished: see classify_group)
        if pending is not None and resolve:
            reports.append((pending[0], False if started is not None or ended is not None else None))
            self.pending = None
            if stopping:
                self.report(pending[0], finished=None)
                job.kill_tree()
                return True
        if ended is not None and rc is None:
            if _traceless(ended, self.files, job, self.hangs.get(ended.number)):
                self.pending = (ended, now + FINISH_WAIT)  # finished, or a re-rendezvous: torchrun shows which
            else:
                reports.append((ended, False))
        elif ended is not None and rc == 0:  # the workers and torchrun ended together: reported after the watch
            self.pending = (ended, now)
        for group, finished in reports:
            if self.report(group, finished=finished):
                return True
        if started is not None:
            sup.say(f"worker group {started.number}: {len(started.pids)} worker(s) started")
            sup.journal.group_start(started.number, len(started.pids))
        current = self.groups.current
        if current is not None and not stopping:
            beats = {rank: b for rank, b in self.files.read_heartbeats().items() if b.pid in current.pids}
            hang = find_hung(beats, sup.expected_reports(beats), current.started, clock.time(), sup.limits)
            if hang:
                sup.journal.hang(current.number, hang, self.files, current.pids)
                sup.say(f"hang detected in worker group {current.number}: {hang}; dumping Python stacks "
                        f"to {self.files.root / 'stacks'}, then killing this node's workers")
                sup.dump_stacks(job, self.files)
                job.signal_workers(int(signal.SIGKILL))  # torchrun sees the failure and restarts the group
                self.hangs[current.number] = hang
        return False

    def report(self, group: Group, *, finished: bool | None) -> bool:
        """Classify and record an ended group; True if the watch ends here (:attr:`stop` or :attr:`backoff`)."""
        counted, decision = _group_ended(self.sup, group, self.files, self.job, self.hangs.pop(group.number, None),
                                         self.tally, self.console, finished=finished)
        if counted:
            self.tally.mark = self.sup.newest_step()
        if decision is None:
            return False
        if decision.action is Action.STOP:
            self.stop = decision
        else:
            self.backoff = decision
        return True


def _group_ended(sup: Supervisor, group: Group, files: AttemptFiles, job: Job, hang: str | None, tally: Tally,
                 console: Console | None = None, *, finished: bool | None = False) -> tuple[bool, Decision | None]:
    """Classify an ended group and record it: (was it a local failure, a decision that ends the watch or None).

    ``finished``: whether torchrun exited 0 after the group (True), started another group or failed (False),
    or neither yet (None); see :func:`classify_group`. The decision is STOP (the policy gave up, or the checkpoint
    directory was taken over), or on a single node a RESTART with a delay (a backoff).
    """
    flush(console, sup.say)  # the group's folded tracebacks, before what the supervisor says of it
    beats = {rank: b for rank, b in files.read_heartbeats().items() if b.pid in group.pids}
    sup.expected_reports(beats)  # a group that ended before any hang check saw its heartbeats still reported
    ranks = {b.pid: rank for rank, b in beats.items() if b.pid is not None}
    verdict = classify_group(group.pids, files.read_errors(), parse_worker_exits(job.tail), files.read_preempted(),
                             signalled=bool(sup.stops) and finished is not True, hang=hang, finished=finished,
                             local_only=not sup.spec.multinode, ranks=ranks)
    newest = sup.newest_step()
    sup.journal.group_end(group.number, verdict.ending.value, verdict.detail, verdict.ending.counted)
    tally.lines.append(f"group {group.number} {verdict.ending.value}: {verdict.detail}; newest checkpoint: "
                       f"{_newest_text(newest)}")
    if verdict.ending is Ending.FINISHED:
        sup.say(f"worker group {group.number} finished ({verdict.detail})")
        return False, None
    if not verdict.ending.counted:
        sup.say(f"worker group {group.number} ended: {verdict.ending.value} ({verdict.detail}); not counted "
                f"as a failure{'; torchrun re-rendezvouses' if finished is False else ''}")
        return False, None
    progressed = tally.progressed(newest, sup.reports)
    outcome = Outcome.HUNG if verdict.ending is Ending.HUNG else Outcome.FAILED
    errors = group_errors(files.read_errors(), group.pids)
    permanent = permanent_failure(len(tally.history), errors) if hang is None else None
    tally.history.append(AttemptResult(len(tally.history), outcome, progressed, None, verdict.detail,
                                       permanent.permanent if permanent is not None else None))
    if verdict.rank is not None:  # the root cause's own error, not the peers' communication errors it caused
        errors = {verdict.rank: errors[verdict.rank]} if verdict.rank in errors else {}
    failure = permanent or root_cause(len(tally.history) - 1, list(job.tail), errors, hang, files.ranks_dir)
    if failure.rank is None and hang is None and permanent is None:
        # No error file and no summary (torchrun prints its summary only when it gives up): the rank the verdict
        # names, with the exit torchrun logged for it, if it did.
        failure.rank = verdict.rank
        pid = next((p for p, r in ranks.items() if r == verdict.rank), None)
        failure.exit_code = parse_worker_exits(job.tail).get(pid) if pid is not None else None
    tally.failures.append(failure)
    sup.journal.failure(len(tally.history) - 1, failure, group=group.number)
    decision = decide(tally.history, sup.policy, sup.jitter())
    if decision.action is Action.STOP:
        return True, decision
    lost = sup.lease_lost()
    if lost is not None:  # restarted workers would only be refused at the lease, group after group
        return True, Decision(Action.STOP, exitcodes.FAILURE, 0.0, f"not restarting: {lost}")
    what = (f"worker group {group.number} {verdict.ending.value} ({verdict.detail}): local failure "
            f"{len(tally.history)} (supervisor.max_restarts={sup.policy.max_restarts})")
    if sup.spec.multinode:
        sup.say(f"{what}; torchrun restarts the workers at the next rendezvous")
        return True, None
    if decision.delay <= 0:
        sup.say(f"{what}; torchrun restarts the workers {_when(0.0)}")
        return True, None
    sup.say(f"{what}; stopping torchrun, restarting {_when(decision.delay)}")
    return True, decision


def _traceless(group: Group, files: AttemptFiles, job: Job, hang: str | None) -> bool:
    """Whether ``group`` ended without a trace: finished, or stopped for a re-rendezvous (or, on a single node, a
    failure without a trace), as torchrun shows next."""
    return classify_group(group.pids, files.read_errors(), parse_worker_exits(job.tail), files.read_preempted(),
                          hang=hang, finished=True).ending is Ending.FINISHED


def _final_marker(files: AttemptFiles, stopping: Group | None) -> PreemptedRecord | None:
    """The preempted.json of the group that was running when the stop came, else None: a marker from an
    earlier group is that group's save for a scale-up, not the final one."""
    marker = files.read_preempted()
    if marker is not None and (stopping is None or marker.pid not in stopping.pids):
        return None
    return marker
