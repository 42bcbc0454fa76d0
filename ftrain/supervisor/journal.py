"""The supervisor's account of the run: its events in the event log, and a progress line every N seconds.

The supervisor's loops call one method per thing that happened (an attempt
started, a worker group ended, a signal came); this module turns each into an
event (docs/FORMAT.md, "Event log") and, every ``supervisor.progress_seconds``,
prints one line built from the same log (the workers' events) and the ranks'
heartbeats, so a person watching the console sees the step, the speed and the
newest checkpoint without reading logs. Emitting never blocks (ftrain/events.py).
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ftrain.attempt import SAVING, AttemptFiles
from ftrain.events import Ev, EventLog, Tail, log_path, node_id, process_start
from ftrain.telemetry.live import progress_line, status_of

if TYPE_CHECKING:
    from ftrain.config import FtrainConfig
    from ftrain.supervisor.notices import Notice
    from ftrain.supervisor.report import Failure


class Journal:
    def __init__(self, cfg: FtrainConfig, run_id: str, say: Callable[[str], None],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        path = log_path(cfg.checkpoint.dir, run_id)
        self.node = node_id(os.getpid())
        self.log = EventLog(path, run=run_id, src="supervisor", node=self.node, host=socket.gethostname())
        self.run_id = run_id
        self._say = say
        self._monotonic = monotonic
        self.every = cfg.supervisor.progress_seconds
        self._next = monotonic() + self.every
        self._tail = Tail(path)
        self._seen: list[dict[str, Any]] = []
        self._files: AttemptFiles | None = None
        self._group_started = 0.0  # wall clock of the current worker group's start

    def emit(self, ev: Ev, **fields: Any) -> None:
        self.log.emit(ev, **fields)

    # ------------------------------------------------------------- happenings
    def launch(self, *, nproc: int, nnodes: tuple[int, int], script: str, cfg: FtrainConfig) -> None:
        # ckpt_dir: where this node saw the checkpoint directory, so that a reader handed a copy or another
        # mount of it (node-local disks) finds this node's attempt directories under it.
        self.emit(Ev.LAUNCH, proc_start=process_start(), ckpt_dir=os.path.abspath(cfg.checkpoint.dir), nproc=nproc,
                  nnodes=list(nnodes), script=script,
                  max_restarts=cfg.supervisor.max_restarts, every_steps=cfg.checkpoint.every_steps,
                  every_seconds=cfg.checkpoint.every_seconds, hang_timeout=cfg.supervisor.hang_timeout_seconds)

    def attempt_start(self, attempt: int, number: int, files: AttemptFiles, pid: int) -> None:
        self._files = files
        self.emit(Ev.ATTEMPT_START, attempt=attempt, number=number, dir=str(files.root), pid=pid)

    def failure(self, attempt: int, failure: Failure, **more: Any) -> None:
        self.emit(Ev.FAILURE, attempt=attempt, rank=failure.rank, exit_code=failure.exit_code,
                  exc_type=failure.exc_type, message=(failure.message or "")[:500] or None, hang=failure.hang,
                  detail=failure.describe(), **more)

    def hang(self, attempt: int, verdict: str, files: AttemptFiles, pids: frozenset[int] | None = None) -> None:
        beats = [b for b in files.read_heartbeats().values() if pids is None or b.pid in pids]
        # The hang began when the silent rank last reported: the oldest heartbeat; its phase says what hung.
        oldest = min(beats, key=lambda b: b.time, default=None)
        self.emit(Ev.HANG, attempt=attempt, verdict=verdict, since=oldest.time if oldest else None,
                  phase=oldest.phase if oldest else None, step=oldest.step if oldest else None)

    def backoff(self, attempt: int, delay: float) -> None:
        self.emit(Ev.BACKOFF, attempt=attempt, delay=delay)

    def signal(self, name: str) -> None:
        """From a signal handler too: emit only (the log's queue is reentrant)."""
        self.emit(Ev.SIGNAL, name=name)

    def notice(self, notice: Notice) -> None:
        self.emit(Ev.NOTICE, source=notice.source, deadline=notice.deadline, detail=notice.detail[:500])

    def group_start(self, group: int, workers: int) -> None:
        self._group_started = time.time()
        self.emit(Ev.GROUP_START, group=group, workers=workers)

    def group_end(self, group: int, ending: str, detail: str, counted: bool) -> None:
        self.emit(Ev.GROUP_END, group=group, ending=ending, detail=detail, counted=counted,
                  saving=self._saving(self._group_started - 1.0))

    def _saving(self, since: float) -> float | None:
        """When the oldest save still in progress began (a rank's heartbeat left in a save by workers that are
        gone: the save stalled or was cut short), or None. Only heartbeats written after ``since`` count: the
        files of ranks an earlier worker group had and this one lacks stay behind."""
        if self._files is None:
            return None
        starts = [b.time for b in self._files.read_heartbeats().values() if b.phase == SAVING and b.time >= since]
        return min(starts, default=None)

    def finish(self, code: int, reason: str) -> None:
        if code not in (0, 75):
            self.emit(Ev.GIVE_UP, exit_code=code, reason=reason)
        self.emit(Ev.LAUNCH_END, exit_code=code, reason=reason)

    def close(self) -> None:
        self.log.close(timeout=2.0)

    # --------------------------------------------------------------- progress
    def tick(self) -> None:
        """Called at every poll: prints the progress line when it is due (``supervisor.progress_seconds``)."""
        if self.every <= 0 or self._monotonic() < self._next:
            return
        self._next = self._monotonic() + self.every
        self.log.flush(0.2)  # our own recent events, so the line agrees with the log
        self._seen.extend(self._tail.new())
        if len(self._seen) > 4000:  # a long run: keep what the line needs (the plan, attempts, the latest events)
            keep = {Ev.LAUNCH, Ev.ATTEMPT_START, Ev.ATTEMPT_END, Ev.GROUP_END, Ev.SESSION_START, Ev.SIGNAL, Ev.NOTICE}
            head = [e for e in self._seen[:-1000] if e["ev"] in keep]
            self._seen = head[-1000:] + self._seen[-1000:]
        beats = {self.node: self._files.read_heartbeats()} if self._files is not None else {}
        self._say(progress_line(status_of(self._seen, beats, time.time(), self.run_id)))
