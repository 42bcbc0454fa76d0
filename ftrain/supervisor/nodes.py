"""Multi-node launches (``ftrain launch --nnodes MIN:MAX``): one long-lived torchrun, watched by the supervisor's one
loop (:func:`ftrain.supervisor.watch.watch`) in the :class:`GroupsWatch` mode.

In a multi-node launch torchrun restarts its workers itself, at every re-rendezvous (a node
left or joined, a local worker failed): an agent that exhausts ``--max-restarts`` closes the
rendezvous for every node (torch/distributed/launcher/api.py), so ours is in effect unlimited
(:data:`TORCHRUN_RESTARTS`). The supervisor watches torchrun's worker groups instead of its exit
(:class:`~ftrain.supervisor.membership.GroupWatch`), classifies why each ended
(:func:`~ftrain.supervisor.membership.classify_group`, pure) and counts only local failures and
hangs, through the same pure :func:`~ftrain.supervisor.policy.decide` as single-node launches.
States: RUNNING -> DONE, or RUNNING -> STOPPING -> DONE after a preemption signal (no BACKOFF:
torchrun restarts the group at once, the rendezvous is the wait). Preemption notices
(:mod:`ftrain.supervisor.notices`) are watched by each node's supervisor for its own machine and stop
this node as a signal does: the current group saves (its ranks agree on the step), this node leaves,
and the other nodes re-rendezvous without it.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.attempt import AttemptFiles
from ftrain.supervisor.command import TORCHRUN_RESTARTS as TORCHRUN_RESTARTS  # (re-exported)
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

#: Seconds between looks at torchrun's workers (a psutil scan).
_GROUP_CHECK = 0.5
#: Seconds a worker group that ended without a trace (no error, no failed exit, no save) waits for torchrun to
#: exit (the workers finished) or to start the next group (a re-rendezvous) before it is reported anyway. Workers
#: that finish leave torchrun in its exit barrier until every node's workers finished: here (2 nodes on one host)
#: the whole finish, from the last step's line to torchrun's exit, took 2.5 s.
_FINISH_WAIT = 5.0


def run_nodes(sup: Supervisor) -> int:
    """A multi-node launch: one torchrun for the whole launch, which re-rendezvouses and restarts its workers.

    Each worker group's end is classified (:func:`ftrain.supervisor.membership.classify_group`): a
    membership change is logged and not counted; a local failure or hang is one attempt in the policy's
    history, and when :func:`decide` says stop, the torchrun tree is killed (SIGKILL: torchrun then does not
    close the rendezvous, so the other nodes carry on without us) and we exit 1 with the root-cause report.
    There is no backoff (torchrun restarts the group at once; the rendezvous is the wait). The crash-loop
    guard counts local failures in a row with no checkpoint newer than at the previous local failure
    (checkpoints committed by groups in between count as progress). A preemption signal to the
    supervisor stops the current group (save, exit 75) and then torchrun; torchrun exiting 0 is success.
    A group that ended without a trace is reported once torchrun exits (0: the ranks finished) or starts the
    next group (a re-rendezvous), or after :data:`_FINISH_WAIT`, whichever comes first.
    """
    if sup.signals:
        sup.set_state(State.DONE)
        return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.signals[0]} before the job started", [],
                          [], sup.newest_step())
    number, files = AttemptFiles.next_attempt(sup.log_dir, sup.spec.run_id)
    files.create()
    console = Console(files.torchrun_log, mistakes=files.mistakes) if sup.echo else None
    # One zygote for the launch: torchrun restarts its groups itself, forking from it each time.
    job = sup.start_job(files, number, console)
    lo, hi = sup.spec.nnodes
    sup.say(f"started torchrun (pid {job.pid}) for {lo}:{hi} node(s), {sup.spec.nproc} worker(s) on this "
            f"node; worker groups are restarted by torchrun at each rendezvous; logs in {files.root}")
    sup.journal.attempt_start(0, number, files, job.pid)
    sup.set_state(State.RUNNING)
    mode = GroupsWatch(sup, job, files, console)
    watch(sup, job, files, mode)
    if mode.stop is not None:  # the policy gave up
        job.kill_tree()
        job.close()
        flush(console, sup.say)
        sup.job = None
        sup.set_state(State.DONE)
        return sup.finish(mode.stop.exit_code, mode.stop.reason, mode.failures, mode.lines, sup.newest_step())
    rc = job.poll()
    job.kill_tree()
    job.close()
    flush(console, sup.say)
    if mode.pending is not None:  # torchrun exited (0: the ranks finished), or we stopped it
        mode.report(mode.pending[0], finished=True if rc == 0 else None if sup.signals else False)
    sup.job = None
    sup.set_state(State.DONE)
    newest = sup.newest_step()
    failures, lines = mode.failures, mode.lines
    if sup.signals:
        marker = _final_marker(files, mode.stopping)
        sup.see_final(marker)
        saved = f"final checkpoint at step {marker.get('step')}" if marker is not None else \
            "no final checkpoint committed"
        if rc == 0 and marker is None:
            return sup.finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
        return sup.finish(exitcodes.PREEMPTED, f"stopped by {sup.signals[0]}: {saved}", failures, lines, newest)
    if rc == 0:
        return sup.finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
    failure = root_cause(len(mode.history), list(job.tail), {}, None, None)
    failure.exit_code = rc
    failures.append(failure)
    return sup.finish(exitcodes.FAILURE, f"torchrun exited with {exit_text(rc) if rc is not None else '?'} "
                      "outside a worker group (rendezvous closed or timed out, or the job already finished on "
                      "the other nodes: see its output above)", failures, lines, newest)


class GroupsWatch:
    """The multi-node :class:`~ftrain.supervisor.watch.Mode`: torchrun's worker groups, each classified when it
    ends; a hang kills this node's workers (torchrun re-rendezvouses); the watch ends with torchrun, or when the
    policy gives up (:attr:`stop`)."""

    checks_exit = True

    def __init__(self, sup: Supervisor, job: Job, files: AttemptFiles, console: Console | None) -> None:
        self.sup, self.job, self.files, self.console = sup, job, files, console
        self.history: list[AttemptResult] = []
        self.failures: list[Failure] = []
        self.lines: list[str] = []
        self.groups = GroupWatch()
        self.hangs: dict[int, str] = {}  # group number -> the hang verdict that ended it
        self.mark = sup.newest_step()  # the newest checkpoint at the previous local failure (crash-loop guard)
        self.stopping: Group | None = None  # the group running when the preemption signal came
        self.pending: tuple[Group, float] | None = None  # a group that ended without a trace, and until when
        self.next_check = sup.clock.monotonic()
        #: The policy's STOP decision, once it gave up.
        self.stop: Decision | None = None

    def stop_requested(self, asked: int, note: str) -> bool:
        sup = self.sup
        self.stopping = self.groups.current
        sup.say(f"{sup.signals[0]}: asked {asked} worker(s) of this node to save and exit within "
                f"{sup.sup.grace_seconds:g}s{note}")
        if self.groups.current is None:
            sup.say("no worker group is running (torchrun is in a rendezvous): stopping torchrun")
            return True
        return False

    def while_stopping(self, asked: int) -> bool:
        if self.sup.notice is not None:
            self.sup.see_final(_final_marker(self.files, self.stopping))
        return False

    def check(self, rc: int | None, stopping: bool) -> bool:
        sup, job, clock = self.sup, self.job, self.sup.clock
        if rc is None and clock.monotonic() < self.next_check:
            return False
        self.next_check = clock.monotonic() + _GROUP_CHECK
        job.tree()
        ended, started = self.groups.observe(job.worker_pids() if rc is None else (), clock.time())
        now = clock.monotonic()
        pending = self.pending
        resolve = pending is not None and (started is not None or ended is not None
                                           or (rc is None and now >= pending[1]))
        if ended is not None and rc is None and stopping:
            job.kill_tree()  # our group saved (or failed) after the stop: torchrun goes too
            return True
        reports: list[tuple[Group, bool | None]] = []  # (group, finished: see classify_group)
        if pending is not None and resolve:
            reports.append((pending[0], False if started is not None or ended is not None else None))
            self.pending = None
        if ended is not None and rc is None:
            if _traceless(ended, self.files, job, self.hangs.get(ended.number)):
                self.pending = (ended, now + _FINISH_WAIT)  # finished, or a re-rendezvous: torchrun shows which
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
                job.signal_workers(int(signal.SIGKILL))  # torchrun sees the failure and re-rendezvouses
                self.hangs[current.number] = hang
        return False

    def report(self, group: Group, *, finished: bool | None) -> bool:
        """Classify and record an ended group; True if the policy gave up (:attr:`stop` is set)."""
        counted, stop = _group_ended(self.sup, group, self.files, self.job, self.hangs.pop(group.number, None),
                                     self.history, self.failures, self.lines, self.mark, self.console,
                                     finished=finished)
        if counted:
            self.mark = self.sup.newest_step()
        self.stop = stop
        return stop is not None


def _group_ended(sup: Supervisor, group: Group, files: AttemptFiles, job: Job, hang: str | None,
                 history: list[AttemptResult], failures: list[Failure], lines: list[str],
                 mark: int | None, console: Console | None = None, *,
                 finished: bool | None = False) -> tuple[bool, Decision | None]:
    """Classify an ended group and record it: (was it a local failure, the policy's STOP decision or None).

    ``finished``: whether torchrun exited 0 after the group (True), started another group or failed (False),
    or neither yet (None); see :func:`classify_group`.
    """
    flush(console, sup.say)  # the group's folded tracebacks, before what the supervisor says of it
    verdict = classify_group(group.pids, files.read_errors(), parse_worker_exits(job.tail), files.read_preempted(),
                             hang=hang, finished=finished)
    newest = sup.newest_step()
    sup.journal.group_end(group.number, verdict.ending.value, verdict.detail, verdict.ending.counted)
    lines.append(f"group {group.number} {verdict.ending.value}: {verdict.detail}; newest checkpoint: "
                 f"{'step ' + str(newest) if newest is not None else 'none'}")
    if verdict.ending is Ending.FINISHED:
        sup.say(f"worker group {group.number} finished ({verdict.detail})")
        return False, None
    if not verdict.ending.counted:
        sup.say(f"worker group {group.number} ended: {verdict.ending.value} ({verdict.detail}); not counted "
                f"as a failure{'; torchrun re-rendezvouses' if finished is False else ''}")
        return False, None
    progressed = (newest is not None and (mark is None or newest > mark)) or not sup.reports
    outcome = Outcome.HUNG if verdict.ending is Ending.HUNG else Outcome.FAILED
    errors = group_errors(files.read_errors(), group.pids)
    permanent = permanent_failure(len(history), errors) if hang is None else None
    history.append(AttemptResult(len(history), outcome, progressed, None, verdict.detail,
                                 permanent.permanent if permanent is not None else None))
    if verdict.rank in errors:  # the local exception, not the peers' communication errors it caused
        errors = {verdict.rank: errors[verdict.rank]}
    failure = permanent or root_cause(len(history) - 1, list(job.tail), {r: dict(e) for r, e in errors.items()},
                                      hang, files.ranks_dir)
    failures.append(failure)
    sup.journal.failure(len(history) - 1, failure, group=group.number)
    decision = decide(history, sup.policy, sup.jitter())
    if decision.action is Action.STOP:
        return True, decision
    sup.say(f"worker group {group.number} {verdict.ending.value} ({verdict.detail}): local failure "
            f"{len(history)} (supervisor.max_restarts={sup.policy.max_restarts}); torchrun restarts the "
            "workers at the next rendezvous")
    return True, None


def _traceless(group: Group, files: AttemptFiles, job: Job, hang: str | None) -> bool:
    """Whether ``group`` ended without a trace: finished, or stopped for a re-rendezvous, as torchrun shows next."""
    return classify_group(group.pids, files.read_errors(), parse_worker_exits(job.tail), files.read_preempted(),
                          hang=hang, finished=True).ending is Ending.FINISHED


def _final_marker(files: AttemptFiles, stopping: Group | None) -> dict[str, Any] | None:
    """The preempted.json of the group that was running when the stop came, else None: a marker from an
    earlier group is that group's save for a scale-up, not the final one."""
    marker = files.read_preempted()
    if marker is not None and (stopping is None or marker.get("pid") not in stopping.pids):
        return None
    return marker
