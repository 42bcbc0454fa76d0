"""Worker side: committing one checkpoint across every disk of the job, in the background writer.

One protocol for every layout (docs/FORMAT.md, "Commit"): one shared directory, or one node-local directory
per node (``layout.py``). The ranks agree through the job's store (``exchange.py``), never through a directory
listing another node could not see:

1. every rank writes its shard into its disk's temp directory (durable), then publishes its shard record;
2. rank 0 gathers every record, builds the manifest (with the placement: which disk holds which ranks' files)
   and publishes it;
3. each disk's leader writes that manifest into its temp directory and renames it ``step-N``: the disk's part
   is committed (the *disk commit*), and says so;
4. with node-local disks and ``checkpoint.replicas``, once every disk has, the leaders copy their disk's files
   to the next disks (``replicas.py``) and say whether what they received arrived intact;
5. rank 0 declares the step committed (the *job commit*: the event log, the log line), and *safe* (the store
   key ``safe``) if every replica arrived: one node's loss then cannot take it;
6. each leader then points ``latest`` at it, applies retention on its disk, and hands it to its uploader
   (``after``).

All of it runs in the background writer: the training thread never waits for it, unless the next save falls
due first (``checkpoint.when_busy``). Replicas are part of the commit so that a committed checkpoint survives
a node's loss as soon as it counts as committed (a lost node costs only the steps since the last commit); if
they fail, the step still commits, unsafe, and retention keeps the newest safe one.

A step is committed only at 5: a disk that committed its part of a step that then failed elsewhere withdraws
it. Retention runs only after 5, so no disk deletes the previous checkpoint before every disk holds the next.
A failure anywhere is reported through the store at once, so nobody waits out the timeout for a dead save;
a rank that never reports is named after ``checkpoint.commit_timeout_seconds``.

Thread-safety: :meth:`run` runs in this rank's background writer, one save at a time; :meth:`report_failure`
on the training thread before anything was submitted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ftrain.checkpoint import format
from ftrain.checkpoint.manifest import FileEntry, Manifest, parse
from ftrain.checkpoint.shard import ShardRecord
from ftrain.checkpoint.snapshot import Snapshot, persist
from ftrain.checkpoint.store import CheckpointStore, build_manifest
from ftrain.errors import CheckpointError, FtrainError
from ftrain.session.exchange import Exchange, wait_for
from ftrain.session.layout import Layout
from ftrain.session.record import WorkerEvents
from ftrain.session.replicas import SAFE_KEY, Replicas

log = logging.getLogger("ftrain")


class Keys:
    """The store keys of one save (under the exchange's ``ftrain/<nonce>/`` prefix). ``seq`` numbers the saves of
    this attempt (every rank makes the same saves in the same order): the same step saved twice (a final save
    right after a scheduled one, with new metrics) must not read the first save's keys."""

    def __init__(self, step: int, seq: int) -> None:
        self.step = step
        self.base = f"save/{seq}-{step}/"

    def record(self, rank: int) -> str:
        return f"{self.base}record/{rank}"

    def error(self, rank: int) -> str:
        return f"{self.base}error/{rank}"

    @property
    def ready(self) -> str:
        return self.base + "ready"

    @property
    def errors(self) -> str:
        return self.base + "errors"

    @property
    def manifest(self) -> str:
        return self.base + "manifest"

    @property
    def abort(self) -> str:
        return self.base + "abort"

    @property
    def done(self) -> str:
        return self.base + "done"

    @property
    def committed(self) -> str:
        return self.base + "committed"

    @property
    def replicate(self) -> str:
        return self.base + "replicate"

    def copied(self, rank: int) -> str:
        return f"{self.base}copied/{rank}"


class SaveProtocol:
    def __init__(self, layout: Layout, exchange: Exchange, store: CheckpointStore, *, timeout: float,
                 guard: Callable[[int], None], events: WorkerEvents | None = None,
                 replicas: Replicas | None = None) -> None:
        """``guard(step)``: the disk's lease check right before its commit rename (raises to refuse);
        ``replicas``: a leader's copies to and from other disks (node-local disks with ``checkpoint.replicas``)."""
        self.layout, self.x, self.store, self.timeout = layout, exchange, store, timeout
        self.guard, self.events, self.replicas = guard, events, replicas
        self._seq = 0
        self._previous: Keys | None = None  # rank 0: the last save's keys, which it deletes at the next commit

    @property
    def rank(self) -> int:
        return self.layout.rank

    # --------------------------------------------------------------- the save
    def begin(self, step: int) -> Keys:
        """The training thread, at every save, failed or not (every rank makes the same calls): its keys."""
        self._seq += 1
        return Keys(step, self._seq)

    def run(self, snap: Snapshot, keys: Keys, tmp: str, meta: dict[str, Any], t0: float,
            blocking_seconds: Callable[[], float], after: Callable[[int, Manifest], None]) -> Manifest | None:
        """This rank's part of saving ``snap`` (see the module docstring); the manifest on a disk's leader.
        ``after(step, manifest)``: the leader's work once the job committed (retention, uploads, replicas).
        Raises on failure, after telling the others."""
        step = snap.step
        try:
            record, json_entry = persist(snap, self.store.storage, tmp)  # type: ignore[arg-type]
        except BaseException as e:
            self.report_failure(keys, tmp, e)
            raise
        self.x.set(keys.record(self.rank), json.dumps({"disk": self.layout.my_disk, "json": [
            json_entry.size, json_entry.checksum], "record": record.to_json()}).encode())
        self.x.add(keys.ready, 1)
        raw: bytes | None = None
        if self.rank == 0:
            try:
                raw = self._build(keys, meta).to_bytes()
            except BaseException as e:
                self._abort(keys, f"{_describe(e)}")
                self.store.storage.delete(tmp)
                raise
            self.x.set(keys.manifest, raw)
        if not self.layout.is_leader:
            if self.x.get(keys.abort) is not None:  # the save failed elsewhere while this shard was written
                self._discard(tmp)
            return None
        if raw is None:
            raw = self._await_manifest(keys, tmp)
        manifest = parse(raw, self.store.storage.describe(tmp))
        try:
            self.store.commit_prepared(tmp, step, raw, _nonce(tmp), lambda: self.guard(step))
        except BaseException as e:
            self.report_failure(keys, tmp, e)
            raise
        self.x.add(keys.done, 1)
        if self.rank == 0:
            self._await_disks(keys)
        copied = self._replicate(keys, manifest) if self.replicas is not None else None
        if self.rank == 0:
            safe = copied is not None and self._await_copies(keys, copied)
            self.x.set(keys.committed, b"1")
            if safe:
                self.x.set(SAFE_KEY, str(step).encode())
            self._forget(keys)
            if self.events is not None:
                self.events.committed(step, time.monotonic() - t0, manifest.total_bytes)
            disks = len(self.layout.order)
            where = "" if disks == 1 else f" on {disks} disks" + (
                f", each file on {len(self.replicas.rounds) + 1}" if safe and self.replicas else "")
            log.info("saved step %d (%.1f MB, %d file(s)%s) in %.3fs, training blocked %.3fs", step,
                     manifest.total_bytes / 1e6, len(manifest.files), where, time.monotonic() - t0,
                     blocking_seconds())
        elif not self._await_commit(keys):
            self.store.withdraw(step)
            raise CheckpointError(f"saving step {step} failed on another disk "
                                  f"({_text(self.x.get(keys.abort))}); this disk's part was withdrawn")
        self.store.point_latest(step)
        after(step, manifest)
        return manifest

    def report_failure(self, keys: Keys, tmp: str, err: BaseException) -> None:
        """Tell rank 0 at once that this rank's part of the save failed (rank 0: tell every disk), and never
        leave a half-written save behind on this disk."""
        step = keys.step
        if self.rank == 0:
            self._abort(keys, _describe(err))
        else:
            try:
                self.x.set(keys.error(self.rank), _describe(err).encode())
                self.x.add(keys.errors, 1)
            except Exception as e:  # the store is gone too: rank 0 names this rank after its timeout
                log.warning("could not report the failed save of step %d: %s", step, e)
        if self.layout.is_leader:
            self.store.storage.delete(tmp)

    def _discard(self, tmp: str) -> None:
        """Remove this rank's files of an aborted save (its leader removes the directory, unless this rank
        re-created it after)."""
        for name in format.shard_names(self.rank):
            self.store.storage.delete(f"{tmp}/{name}")
        with contextlib.suppress(OSError):
            os.rmdir(self.store.storage.describe(tmp))

    # ------------------------------------------------------------- rank 0
    def _build(self, keys: Keys, meta: dict[str, Any]) -> Manifest:
        step, world = keys.step, self.layout.world_size
        deadline = time.monotonic() + self.timeout

        def ready() -> bool | None:
            self._raise_reported(keys)
            return True if self.x.add(keys.ready, 0) >= world else None

        try:
            wait_for(ready, deadline)
        except TimeoutError:
            missing = [r for r in range(world) if self.x.get(keys.record(r)) is None]
            raise CheckpointError(
                f"saving step {step}: {_who(self.layout, missing)} did not report a durable shard within "
                f"{self.timeout:.0f}s (checkpoint.commit_timeout_seconds): the process died or hangs, or its disk "
                "does not answer") from None
        records: list[tuple[ShardRecord, FileEntry]] = []
        placement: dict[str, list[int]] = {}
        for r in range(world):
            raw = self.x.get(keys.record(r))
            try:
                doc = json.loads(raw or b"")
                rec = ShardRecord.from_json(doc["record"])
                size, digest = doc["json"]
                if rec.rank != r or rec.step != step:
                    raise ValueError(f"record of rank {rec.rank} step {rec.step}")
                entry = FileEntry(int(size), str(digest), r)
                disk = str(doc["disk"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"saving step {step}: rank {r}'s shard record is unreadable "
                                      f"({type(e).__name__}: {e})") from None
            records.append((rec, entry))
            placement.setdefault(disk, []).append(r)
        for r in range(world):
            self.x.delete(keys.record(r))
        return build_manifest(records, step=step, meta=meta,
                              placement={d: tuple(ranks) for d, ranks in placement.items()})

    def _await_disks(self, keys: Keys) -> None:
        step, disks = keys.step, len(self.layout.order)

        def done() -> bool | None:
            self._raise_reported(keys)
            return True if self.x.add(keys.done, 0) >= disks else None

        try:
            wait_for(done, time.monotonic() + self.timeout)
        except TimeoutError:
            self._abort(keys, "a disk did not commit its part in time")
            raise CheckpointError(f"saving step {step}: not every disk committed its part within "
                                  f"{self.timeout:.0f}s (checkpoint.commit_timeout_seconds)") from None
        except BaseException as e:
            self._abort(keys, _describe(e))
            self.store.withdraw(step)
            raise

    def _await_copies(self, keys: Keys, mine: list[str]) -> bool:
        """Rank 0: whether every disk received its replicas of ``step`` intact (if not, the step is committed but
        not safe against a node's loss: said once, loudly; the newest safe checkpoint is kept)."""
        others = [r for r in self.layout.leaders if r != 0]

        def reports() -> list[bytes] | None:
            got = [self.x.get(keys.copied(r)) for r in others]
            return None if any(g is None for g in got) else [g for g in got if g is not None]

        try:
            got = wait_for(reports, time.monotonic() + self.timeout)
        except TimeoutError:
            got = [b"no report"]
        for r in others:
            self.x.delete(keys.copied(r))
        bad = [*mine, *(g.decode(errors="replace") for g in got if g != b"")]
        if bad:
            log.error("checkpoint step %d is committed but not safe against a node's loss: replicas did not arrive "
                      "intact (%s); the newest safe checkpoint is kept", keys.step, "; ".join(bad))
        return not bad

    def _replicate(self, keys: Keys, manifest: Manifest) -> list[str]:
        """A leader, once every disk committed ``step``: the pairwise exchange of replicas (``replicas.py``);
        the files it received that were not intact (reported to rank 0)."""
        assert self.replicas is not None
        if self.rank == 0:
            self.x.set(keys.replicate, b"1")
        elif not self._await_go(keys):
            return []  # the save failed elsewhere: nothing to copy (the commit wait below says so)
        try:
            failed = self.replicas.copy(keys.step, manifest)
        except Exception as e:  # a peer died mid-transfer: this step is not safe; the job restarts anyway
            failed = [f"{type(e).__name__}: {e}"]
        if self.rank != 0:
            self.x.set(keys.copied(self.rank), ", ".join(failed).encode())
        return failed

    def _await_go(self, keys: Keys) -> bool:
        def look() -> bool | None:
            if self.x.get(keys.replicate) is not None:
                return True
            return False if self.x.get(keys.abort) is not None else None

        try:
            return bool(wait_for(look, time.monotonic() + self.timeout))
        except TimeoutError:
            return False

    def _raise_reported(self, keys: Keys) -> None:
        if self.x.add(keys.errors, 0) <= 0:
            return
        for r in range(self.layout.world_size):
            reason = self.x.get(keys.error(r))
            if reason is not None:
                raise CheckpointError(f"rank {r} failed to write its shard of step {keys.step}: {_text(reason)}")

    def _abort(self, keys: Keys, reason: str) -> None:
        try:
            self.x.set(keys.abort, reason.encode())
        except Exception as e:
            log.warning("could not tell the other disks that the save failed: %s", e)

    def _forget(self, keys: Keys) -> None:
        """The store keys of the save before this one (its leaders have read them by now)."""
        if self._previous is not None:
            old = self._previous
            for key in (old.manifest, old.ready, old.done, old.committed, old.errors, old.abort, old.replicate):
                self.x.delete(key)
        self._previous = keys

    # ------------------------------------------------------------- leaders
    def _await_manifest(self, keys: Keys, tmp: str) -> bytes:
        step = keys.step

        def look() -> bytes | None:
            reason = self.x.get(keys.abort)
            if reason is not None:
                raise CheckpointError(f"saving step {step} failed: {_text(reason)}")
            return self.x.get(keys.manifest)

        try:
            raw: bytes = wait_for(look, time.monotonic() + self.timeout)
        except TimeoutError:
            self.store.storage.delete(tmp)
            raise CheckpointError(f"saving step {step}: rank 0 published no manifest within {self.timeout:.0f}s "
                                  "(checkpoint.commit_timeout_seconds)") from None
        except CheckpointError:
            self.store.storage.delete(tmp)
            raise
        return raw

    def _await_commit(self, keys: Keys) -> bool:
        """Whether the job committed ``step`` (False: it failed elsewhere, or rank 0 never said)."""
        def look() -> bool | None:
            if self.x.get(keys.committed) is not None:
                return True
            return False if self.x.get(keys.abort) is not None else None

        try:
            return bool(wait_for(look, time.monotonic() + self.timeout))
        except TimeoutError:
            self._abort(keys, "rank 0 did not confirm the commit in time")
            return False


def _nonce(tmp: str) -> str:
    return tmp.rsplit("-", 1)[-1]


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, FtrainError) else f"{type(err).__name__}: {err}"


def _text(raw: bytes | None) -> str:
    return (raw or b"unknown reason").decode(errors="replace")


def _who(layout: Layout, ranks: list[int]) -> str:
    by_disk: dict[str, list[int]] = {}
    for r in ranks:
        by_disk.setdefault(layout.disks[r], []).append(r)
    parts = [f"rank(s) {', '.join(map(str, rs))} on {layout.describe(d)}" for d, rs in by_disk.items()]
    return "; ".join(parts)
