"""Worker side: the remote tier in the checkpoint protocol (``checkpoint.remote``).

* Save: after the job commits a step, each disk's leader uploads its files of it in the background
  (:class:`~ftrain.checkpoint.upload.Uploader`); with one directory for the whole job that is every file,
  with node-local disks its own ranks' (docs/FORMAT.md, "Disks"), and rank 0's uploader writes the remote
  manifest only once every disk's files are remote (they say so through the job's store). Local retention
  keeps every step whose upload is pending. At start, with one directory, rank 0 queues the newest local
  checkpoint if the remote tier lacks it (an upload a crash cut short).
* Restore: the remote tier is one more source (``sources.py``): rank 0 lists what it holds
  (:meth:`RemoteTier.holdings`), and a disk that lacks files its ranks read downloads them, verified while
  streaming, when no disk has them.
* Preemption: the final save's upload is awaited within the grace period.

Not thread-safe: used by the training thread and the writer (the uploader has its own thread).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ftrain.checkpoint import format
from ftrain.checkpoint.assembly import Held
from ftrain.checkpoint.checksum import digest
from ftrain.checkpoint.remote import RemoteStorage
from ftrain.checkpoint.store import CheckpointStore, open_store
from ftrain.checkpoint.upload import RetryPolicy, Share, Uploader
from ftrain.config import CheckpointConfig
from ftrain.errors import CheckpointDirError, CorruptCheckpoint
from ftrain.session.exchange import Exchange, wait_for
from ftrain.session.layout import Layout
from ftrain.session.record import WorkerEvents

log = logging.getLogger("ftrain")


class RemoteTier:
    def __init__(self, cfg: CheckpointConfig, local: CheckpointStore, events: WorkerEvents | None = None) -> None:
        self.cfg, self.local, self.events = cfg, local, events
        try:
            self.remote = open_store(cfg.remote.url)
        except OSError as e:
            raise CheckpointDirError(f"checkpoint.remote.url {cfg.remote.url!r}: {e.strerror or e}") from None
        self.uploader: Uploader | None = None
        #: The start found the remote tier unavailable (already logged: the restore does not say it again).
        self.down = False

    # ------------------------------------------------------------------ save
    def start(self, layout: Layout, exchange: Exchange, on_uploaded: Callable[[int], None]) -> None:
        """Each disk's leader, in setup: its uploader; with one directory, a catch-up upload of the newest local
        step the remote tier lacks. ``on_uploaded(step)``: rank 0's uploader thread, once ``step`` is committed
        remotely."""
        if not layout.is_leader or self.uploader is not None:
            return
        try:
            if isinstance(self.remote.storage, RemoteStorage):  # (always: checkpoint.remote.url is checked to be a URL)
                self.remote.storage.check()  # a bucket that does not exist: RemoteNotFound, a mistake (exit 2)
            down: OSError | None = None
        except OSError as e:  # unreachable, refused credentials: an outage; training goes on
            down = e
        share, when_busy = Share(), self.cfg.when_busy
        if not layout.shared:
            disks = len(layout.order)

            def others(step: int) -> None:
                def look() -> bool | None:
                    error = exchange.get(f"upload/{step}/failed")
                    if error is not None:
                        raise OSError(f"another disk's files of step {step} did not reach the remote tier: "
                                      f"{error.decode(errors='replace')}")
                    return True if exchange.add(f"upload/{step}", 0) >= disks else None

                try:
                    wait_for(look, time.monotonic() + self.cfg.commit_timeout_seconds)
                except TimeoutError:
                    raise OSError(f"not every disk's files of step {step} reached the remote tier within "
                                  f"{self.cfg.commit_timeout_seconds:.0f}s; see the other nodes' logs") from None
                finally:
                    for key in (f"upload/{step}", f"upload/{step}/failed"):
                        exchange.delete(key)

            def sent(step: int) -> None:
                exchange.add(f"upload/{step}", 1)

            def failed(step: int, error: str) -> None:
                exchange.set(f"upload/{step}/failed", f"{layout.describe(layout.my_disk)}: {error}".encode())

            share = Share(files=lambda m: m.primary_files(layout.my_disk), publish=layout.rank == 0, sent=sent,
                          failed=failed, others=others)
            when_busy = "wait"  # every disk must upload the same steps: none may skip one the others send
        events = self.events

        def result(step: int, seconds: float, error: str | None) -> None:
            if error is None:
                on_uploaded(step)
            if events is not None:
                events.upload(step, seconds, error)

        self.uploader = Uploader(self.local, self.remote, keep_last=self.cfg.remote.keep_last, when_busy=when_busy,
                                 retry=RetryPolicy(attempts=self.cfg.remote.retries), share=share, on_result=result)
        if down is not None:
            self.down = True
            self.uploader.unavailable(down)
        if layout.shared:
            newest = next(self.local.candidates(), None)
            if newest is not None and not self._on_remote(newest.step):
                log.info("checkpoint step %d is not on the remote tier yet: uploading it", newest.step)
                self.uploader.submit(newest.step)

    def committed(self, step: int, best: list[int]) -> None:
        """A disk's leader, after the job committed ``step``."""
        if self.uploader is not None:
            self.uploader.submit(step, best)

    def pending(self) -> list[int]:
        return sorted(self.uploader.pending()) if self.uploader is not None else []

    def wait(self, step: int, timeout: float) -> float | None:
        """Rank 0: when ``step`` became durable remotely, or None (failed, dropped, or not within ``timeout``)."""
        return self.uploader.wait(step, timeout) if self.uploader is not None else None

    def close(self, timeout: float) -> None:
        if self.uploader is not None:
            if not self.uploader.close(timeout):
                log.error("exiting with uploads to %s unfinished after %.0fs; the local checkpoints stay, and the "
                          "next start uploads the newest", self.remote.storage.describe(), timeout)
            self.uploader = None

    def _on_remote(self, step: int) -> bool:
        try:
            self.remote.storage.size(f"{format.step_dirname(step)}/{format.MANIFEST}")
        except (FileNotFoundError, OSError):
            return False
        return True

    # --------------------------------------------------------------- restore
    def holdings(self) -> dict[int, Held]:
        """Rank 0: the remote steps that pass the cheap checks (a remote manifest is written only after every
        file: each holds all its files)."""
        out: dict[int, Held] = {}
        try:
            steps = self.remote.steps()
        except OSError as e:  # unreachable remote: restore from what the disks hold, and say so (once)
            (log.debug if self.down else log.warning)(
                "the remote tier %s cannot be listed (%s); restoring from local checkpoints only",
                self.remote.storage.describe(), e)
            return out
        for step in steps:
            try:
                m, raw = self.remote.read_manifest_raw(step)
                self.remote.check_files(m, whole=True)
            except (CorruptCheckpoint, OSError) as e:
                log.warning("skipping remote checkpoint step %d: %s", step, getattr(e, "reason", e))
                continue
            out[step] = Held(digest(raw), frozenset(m.files), frozenset(m.files), frozenset(m.placement))
        return out
