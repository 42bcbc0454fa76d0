"""The background writer: persists (and, on a disk's leader, commits) one snapshot at a time, off the training
thread.

A thread, not a process: the work is ``os.write``/``fsync`` and XXH3 over large
buffers, all of which release the GIL, so the training thread keeps running
(measured in docs/PERFORMANCE.md), and a thread needs no second copy of the
snapshot. It never touches the training process group: ranks coordinate the
commit through the job's store (``session/commit.py``: shard records, error
reports), so a slow or failed write cannot deadlock a collective.

Contract: at most one job in flight (``submit`` refuses otherwise). A failure
is kept and reported to the training thread by :meth:`failed`/:meth:`take_error`;
the session turns it into an error on every rank at the next step.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ftrain.checkpoint")


class BackgroundWriter:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], name: str) -> None:
        if self.busy():
            raise RuntimeError("a checkpoint write is already in flight")
        # A daemon, so a crashing process is never held up by a commit that waits for dead ranks; the
        # session's exit hook waits (bounded) for an in-flight write in the normal case.
        self._thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # kept for the training thread; nothing may escape a thread silently
            self._error = e
            log.error("background checkpoint write failed: %s", e)

    def wait(self, timeout: float | None = None) -> bool:
        """Join the in-flight job; False if it is still running after ``timeout`` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def failed(self) -> bool:
        return self._error is not None and not self.busy()

    def take_error(self) -> BaseException | None:
        err, self._error = self._error, None
        return err
