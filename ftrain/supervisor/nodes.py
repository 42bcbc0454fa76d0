"""Multi-node launches (``ftrain launch --nnodes MIN:MAX``): the supervisor's loop around one long-lived torchrun.

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

if TYPE_CHECKING:
    from ftrain.supervisor.job import Job
    from ftrain.supervisor.supervisor import Supervisor

#: Seconds between looks at torchrun's workers (a psutil scan).
_GROUP_CHECK = 0.5
#: Seconds between polls of torchrun (signals, exit).
_POLL = 0.1
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
    clock = sup.clock
    if sup._signals:
        sup._set(State.DONE)
        return sup._finish(exitcodes.PREEMPTED, f"stopped by {sup._signals[0]} before the job started", [],
                           [], sup._newest_step())
    number, files = AttemptFiles.next_attempt(sup.log_dir, sup.spec.run_id)
    files.create()
    console = Console(files.torchrun_log, mistakes=files.mistakes) if sup.echo else None
    zygote = sup.warm()  # one for the launch: torchrun restarts its groups itself, forking from it each time
    job = sup._job = sup._start_job(sup._command(files), sup._env(files, number), files.torchrun_log,
                                    echo=console, warm=zygote.workers if zygote is not None else None)
    lo, hi = sup.spec.nnodes
    sup._say(f"started torchrun (pid {job.pid}) for {lo}:{hi} node(s), {sup.spec.nproc} worker(s) on this "
             f"node; worker groups are restarted by torchrun at each rendezvous; logs in {files.root}")
    sup.journal.attempt_start(0, number, files, job.pid)
    sup._set(State.RUNNING)
    history: list[AttemptResult] = []
    failures: list[Failure] = []
    lines: list[str] = []
    watch = GroupWatch()
    hangs: dict[int, str] = {}  # group number -> the hang verdict that ended it
    mark = sup._newest_step()  # the newest checkpoint at the previous local failure (the crash-loop guard)
    grace_deadline: float | None = None
    stopping: Group | None = None  # the group running when the preemption signal came
    pending: tuple[Group, float] | None = None  # a group that ended without a trace, and until when it waits
    next_check = clock.monotonic()
    while True:
        rc = job.poll()
        if sup._stop_now():
            sup._say(f"second signal ({sup._signals[-1]}): stopping now")
            job.kill_tree()
            break
        if sup._signals and grace_deadline is None:
            sup._set(State.STOPPING)
            grace_deadline = clock.monotonic() + sup.sup.grace_seconds
            stopping = watch.current
            stop_note = sup._write_stop(files)
            n = job.signal_new_workers(sup._forward_signal())
            sup._say(f"{sup._signals[0]}: asked {n} worker(s) of this node to save and exit within "
                     f"{sup.sup.grace_seconds:g}s{stop_note}")
            if watch.current is None:
                sup._say("no worker group is running (torchrun is in a rendezvous): stopping torchrun")
                job.kill_tree()
                break
        elif grace_deadline is not None:
            job.signal_new_workers(sup._forward_signal())
            if sup._notice is not None:
                sup._see_final(_final_marker(files, stopping))
            if clock.monotonic() > grace_deadline:
                sup._say(f"grace period of {sup.sup.grace_seconds:g}s ran out: killing the job "
                         "(the previous checkpoint stays valid)")
                job.kill_tree()
                break
        if rc is not None or clock.monotonic() >= next_check:
            next_check = clock.monotonic() + _GROUP_CHECK
            job.tree()
            ended, started = watch.observe(job.worker_pids() if rc is None else (), clock.time())
            now = clock.monotonic()
            resolve = pending is not None and (started is not None or ended is not None
                                               or (rc is None and now >= pending[1]))
            if ended is not None and rc is None and grace_deadline is not None:
                job.kill_tree()  # our group saved (or failed) after the stop: torchrun goes too
                break
            reports: list[tuple[Group, bool | None]] = []  # (group, finished: see classify_group)
            if pending is not None and resolve:
                reports.append((pending[0], False if started is not None or ended is not None else None))
                pending = None
            if ended is not None and rc is None:
                if _traceless(ended, files, job, hangs.get(ended.number)):
                    pending = (ended, now + _FINISH_WAIT)  # finished, or a re-rendezvous: torchrun shows which
                else:
                    reports.append((ended, False))
            elif ended is not None and rc == 0:  # the workers and torchrun ended together: reported below
                pending = (ended, now)
            for group, finished in reports:
                counted, stop = _group_ended(sup, group, files, job, hangs.pop(group.number, None), history,
                                              failures, lines, mark, console, finished=finished)
                if counted:
                    mark = sup._newest_step()
                if stop is not None:
                    job.kill_tree()
                    job.close()
                    flush(console, sup._say)
                    sup._job = None
                    sup._set(State.DONE)
                    return sup._finish(stop.exit_code, stop.reason, failures, lines, sup._newest_step())
            if started is not None:
                sup._say(f"worker group {started.number}: {len(started.pids)} worker(s) started")
                sup.journal.group_start(started.number, len(started.pids))
            current = watch.current
            if current is not None and grace_deadline is None:
                beats = {rank: b for rank, b in files.read_heartbeats().items() if b.pid in current.pids}
                hang = find_hung(beats, sup.expected_reports(beats), current.started, clock.time(), sup.limits)
                if hang:
                    sup.journal.hang(current.number, hang, files, current.pids)
                    sup._say(f"hang detected in worker group {current.number}: {hang}; dumping Python stacks "
                             f"to {files.root / 'stacks'}, then killing this node's workers")
                    sup.dump_stacks(job, files)
                    job.signal_workers(int(signal.SIGKILL))  # torchrun sees the failure and re-rendezvouses
                    hangs[current.number] = hang
        if rc is not None:
            break
        sup.journal.tick()
        clock.sleep(_POLL)
    rc = job.poll()
    job.kill_tree()
    job.close()
    flush(console, sup._say)
    if pending is not None:  # torchrun exited (0: the ranks finished), or we stopped it
        _group_ended(sup, pending[0], files, job, hangs.pop(pending[0].number, None), history, failures, lines,
                     mark, console, finished=True if rc == 0 else None if sup._signals else False)
    sup._job = None
    sup._set(State.DONE)
    newest = sup._newest_step()
    if sup._signals:
        marker = _final_marker(files, stopping)
        sup._see_final(marker)
        saved = f"final checkpoint at step {marker.get('step')}" if marker is not None else \
            "no final checkpoint committed"
        if rc == 0 and marker is None:
            return sup._finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
        return sup._finish(exitcodes.PREEMPTED, f"stopped by {sup._signals[0]}: {saved}", failures, lines,
                           newest)
    if rc == 0:
        return sup._finish(exitcodes.OK, "all ranks finished", failures, lines, newest)
    failure = root_cause(len(history), list(job.tail), {}, None, None)
    failure.exit_code = rc
    failures.append(failure)
    return sup._finish(exitcodes.FAILURE, f"torchrun exited with {exit_text(rc) if rc is not None else '?'} "
                       "outside a worker group (rendezvous closed or timed out, or the job already finished on "
                       "the other nodes: see its output above)", failures, lines, newest)


def _group_ended(sup: Supervisor, group: Group, files: AttemptFiles, job: Job, hang: str | None,
                 history: list[AttemptResult], failures: list[Failure], lines: list[str],
                 mark: int | None, console: Console | None = None, *,
                 finished: bool | None = False) -> tuple[bool, Decision | None]:
    """Classify an ended group and record it: (was it a local failure, the policy's STOP decision or None).

    ``finished``: whether torchrun exited 0 after the group (True), started another group or failed (False),
    or neither yet (None); see :func:`classify_group`.
    """
    flush(console, sup._say)  # the group's folded tracebacks, before what the supervisor says of it
    verdict = classify_group(group.pids, files.read_errors(), parse_worker_exits(job.tail), files.read_preempted(),
                             hang=hang, finished=finished)
    newest = sup._newest_step()
    sup.journal.group_end(group.number, verdict.ending.value, verdict.detail, verdict.ending.counted)
    lines.append(f"group {group.number} {verdict.ending.value}: {verdict.detail}; newest checkpoint: "
                 f"{'step ' + str(newest) if newest is not None else 'none'}")
    if verdict.ending is Ending.FINISHED:
        sup._say(f"worker group {group.number} finished ({verdict.detail})")
        return False, None
    if not verdict.ending.counted:
        sup._say(f"worker group {group.number} ended: {verdict.ending.value} ({verdict.detail}); not counted "
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
    decision = decide(history, sup.policy, sup._jitter())
    if decision.action is Action.STOP:
        return True, decision
    sup._say(f"worker group {group.number} {verdict.ending.value} ({verdict.detail}): local failure "
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
