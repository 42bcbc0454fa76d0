"""Worker side: the remote tier in the checkpoint protocol (``checkpoint.remote``).

* Save: after rank 0 commits a step locally, its :class:`~ftrain.checkpoint.upload.Uploader`
  publishes it in the background; local retention keeps every step whose upload
  is pending. At start, rank 0 queues the newest local checkpoint if the remote
  tier lacks it (an upload a crash cut short).
* Restore: rank 0 proposes the newest checkpoint that validates in either tier
  (local preferred for the same step). A remote-only one is fetched first: every
  rank downloads the files it owns (rank 0 also those of saving ranks beyond
  this run's world size), verified while streaming; the ranks agree; rank 0
  commits the directory locally; then it is restored like any local one.
* Preemption: the final save's upload is awaited within the grace period.

Not thread-safe: used by the training thread (the uploader has its own).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from ftrain.checkpoint import format
from ftrain.checkpoint.download import download_files, files_of, orphan_ranks
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.store import CheckpointStore, open_store
from ftrain.checkpoint.upload import RetryPolicy, Uploader
from ftrain.config import CheckpointConfig
from ftrain.errors import CheckpointDirError, CorruptCheckpoint
from ftrain.session.collectives import Collectives
from ftrain.session.record import WorkerEvents

log = logging.getLogger("ftrain")

LOCAL, REMOTE = 0, 1


class RemoteTier:
    def __init__(self, cfg: CheckpointConfig, coll: Collectives, local: CheckpointStore,
                 events: WorkerEvents | None = None) -> None:
        self.cfg, self.coll, self.local, self.events = cfg, coll, local, events
        try:
            self.remote = open_store(cfg.remote)
        except OSError as e:
            raise CheckpointDirError(f"checkpoint.remote {cfg.remote!r}: {e.strerror or e}") from None
        self.uploader: Uploader | None = None

    # ------------------------------------------------------------------ save
    def start(self) -> None:
        """Rank 0, in setup: the uploader, and a catch-up upload of the newest local step the remote lacks."""
        if self.coll.rank != 0 or self.uploader is not None:
            return
        self.uploader = Uploader(self.local, self.remote, keep_last=self.cfg.remote_keep_last,
                                 when_busy=self.cfg.when_busy, retry=RetryPolicy(attempts=self.cfg.remote_retries),
                                 on_result=self.events.upload if self.events is not None else None)
        newest = next(self.local.candidates(), None)
        if newest is not None and not self._on_remote(newest.step):
            log.info("checkpoint step %d is not on the remote tier yet: uploading it", newest.step)
            self.uploader.submit(newest.step)

    def committed(self, step: int, best: list[int]) -> None:
        """Rank 0, after the local commit of ``step``."""
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
    def candidates(self, local: Iterator[Manifest]) -> Iterator[tuple[Manifest, int]]:
        """Rank 0: (manifest, tier) newest first over both tiers; a step valid locally is taken from there."""
        loc = {m.step: m for m in local}
        try:
            rem = {m.step: m for m in self.remote.candidates()}
        except OSError as e:  # unreachable remote: restore from what is local, and say so
            log.warning("the remote tier %s cannot be listed (%s); restoring from local checkpoints only",
                        self.remote.storage.describe(), e)
            rem = {}
        for step in sorted(set(loc) | set(rem), reverse=True):
            yield (loc[step], LOCAL) if step in loc else (rem[step], REMOTE)

    def fetch(self, step: int, manifest: Manifest | None, nonce: str) -> Manifest:
        """Collective: download remote checkpoint ``step`` into the local root, each rank its own files.

        ``manifest``: the remote manifest, if this rank has it (rank 0 proposed it). Raises
        :class:`CorruptCheckpoint` on every rank if any rank's download failed verification (so all fall back
        together); returns the local manifest once rank 0 has committed the directory.
        """
        tmp = f"{format.TMP_PREFIX}download-{format.step_dirname(step)}-{nonce}"
        damage: CorruptCheckpoint | None = None
        t0 = time.monotonic()
        if self.coll.rank == 0:
            self.local.storage.makedir(tmp)
        self.coll.broadcast([0])  # a barrier: the directory exists for every rank
        try:
            manifest = manifest or self.remote.read_manifest(step)
            mine = files_of(manifest, self.coll.rank)
            if self.coll.rank == 0:
                for r in orphan_ranks(manifest, self.coll.world_size):
                    mine += files_of(manifest, r)
            got = download_files(self.remote.storage, self.local.storage, manifest, mine, tmp)  # type: ignore[arg-type]
            log.info("downloaded %.1f MB of checkpoint step %d from %s in %.2fs", got / 1e6, manifest.step,
                     self.remote.storage.describe(), time.monotonic() - t0)
        except CorruptCheckpoint as e:
            damage = e
        except OSError as e:
            damage = CorruptCheckpoint(self.remote.storage.describe(format.step_dirname(step)),
                                       f"download failed: {e}")
        if self.coll.any(damage is not None)[0]:
            if self.coll.rank == 0:
                self.local.storage.delete(tmp)
            raise damage or CorruptCheckpoint(self.remote.storage.describe(format.step_dirname(step)),
                                              "another rank's download failed; see its log")
        if self.coll.rank == 0:
            final = format.step_dirname(step)
            raw = self.remote.storage.read(f"{final}/{format.MANIFEST}", format.MAX_MANIFEST_BYTES)
            self.local.storage.write(f"{tmp}/{format.MANIFEST}", raw)
            if self.local.storage.is_dir(final):  # a damaged local copy of the same step: replaced
                self.local.storage.delete(final)
            self.local.storage.commit(tmp, final)
        self.coll.broadcast([0])  # a barrier: committed locally
        return self.local.read_manifest(step)
