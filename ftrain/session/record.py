"""Worker side of the event log (docs/FORMAT.md, "Event log"): what a training process records, and who records it.

The job's progress is the same on every rank, so global rank 0 alone records
restores, steps, saves, commits and uploads; each node's local rank 0 also
records its own start (``session_start``), which is when its share of startup
ends and where the node's lane in the timeline begins. Every other rank keeps a
log that drops everything: one file per run stays small at any world size.

All of it goes through :class:`~ftrain.events.EventLog`, which never blocks:
a step costs one clock read here, a ``progress`` event every
:data:`~ftrain.events.PROGRESS_SECONDS`.
"""
from __future__ import annotations

import os
import time
from typing import Any

from ftrain import envvars
from ftrain.events import PROGRESS_SECONDS, Ev, EventLog, log_path, node_id, process_start


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


class WorkerEvents:
    def __init__(self, root: str, rank: int) -> None:
        self.run = os.environ.get(envvars.RUN_ID) or os.environ.get("TORCHELASTIC_RUN_ID") or "standalone"
        launcher = _env_int(envvars.LAUNCHER_PID)
        self.lead = rank == 0
        self.node_lead = (_env_int(envvars.LOCAL_RANK) or 0) == 0
        active = self.lead or self.node_lead
        self.log = EventLog(log_path(root, self.run) if active else None, run=self.run, src="worker",
                            node=node_id(launcher if launcher is not None else os.getppid()), rank=rank,
                            attempt=_env_int(envvars.ATTEMPT), group=_env_int(envvars.RESTART_COUNT) or 0,
                            pid=os.getpid())
        self._next_progress = 0.0
        self._stepped = False
        self.step_seen: int | None = None

    def _lead(self, ev: Ev, **fields: Any) -> None:
        if self.lead:
            self.log.emit(ev, **fields)

    def start(self, world: int, total_steps: int | None) -> None:
        self.log.emit(Ev.SESSION_START, proc_start=process_start(), world=world,
                      local_rank=_env_int(envvars.LOCAL_RANK) or 0, total_steps=total_steps)

    def restore(self, step: int, start: float, seconds: float, found: bool) -> None:
        self._lead(Ev.RESTORE, step=step, start=start, seconds=round(seconds, 6), found=found)
        self._next_progress = time.monotonic() + PROGRESS_SECONDS

    def step(self, step: int) -> None:
        self.step_seen = step
        if not self.lead:
            return
        if not self._stepped:
            self._stepped = True
            self.log.emit(Ev.FIRST_STEP, step=step)
            return
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + PROGRESS_SECONDS
            self.log.emit(Ev.PROGRESS, step=step)

    def save(self, step: int, start: float, blocking: float) -> None:
        self._lead(Ev.SAVE, step=step, start=start, blocking=round(blocking, 6))

    def committed(self, step: int, seconds: float, nbytes: int) -> None:
        """From the committing thread (rank 0's background writer, or the training thread)."""
        self._lead(Ev.COMMITTED, step=step, seconds=round(seconds, 6), bytes=nbytes)

    def upload(self, step: int, seconds: float, error: str | None) -> None:
        """From rank 0's uploader thread: ``step`` is durable on the remote tier, or its upload failed."""
        if error is None:
            self._lead(Ev.UPLOADED, step=step, seconds=round(seconds, 6))
        else:
            self._lead(Ev.UPLOAD_FAILED, step=step, seconds=round(seconds, 6), error=error[:500])

    def preempted(self, step: int, reason: str | None, uploaded: bool | None) -> None:
        self._lead(Ev.PREEMPTED, step=step, reason=reason, uploaded=uploaded)

    def finished(self) -> None:
        self._lead(Ev.FINISHED, step=self.step_seen)

    def flush(self, timeout: float = 0.5) -> None:
        self.log.flush(timeout)

    def close(self) -> None:
        self.log.close()
