"""Worker side of the checkpoint protocol: every rank saves its share and restores with the others.

Save and restore state trees as sharded, verified checkpoints, synchronously or in the background.

Save = snapshot (training thread: encode, copy tensors into a reused host
buffer) + persist (write, fsync, checksum) + commit (rank 0: manifest, rename,
``latest``, prune). Replicated state (identical on every rank) is written once
in total: its tensors are split across ranks by :func:`snapshot.owners` (the
buffers of replicated modules all by rank 0: they differ per rank under DDP, and
rank 0's are the ones DDP broadcasts next); each rank also writes its per-rank
state. ``checkpoint.check_replicated`` compares the rest across ranks first
(``replication.py``). With ``checkpoint.async_save`` the persist
and commit run in a :class:`BackgroundWriter` thread and the ranks coordinate
through the filesystem only; otherwise they run inline and the ranks agree on
success with two small collectives.

Restore: every rank verifies the blocks it reads (``reading.py``) and reads each
tensor straight into where it goes: a registered module's own tensors in place,
the local shards of sharded (DTensor) state at any world size. On a single node
it reads the replicated tensors from the page cache (one disk read per node);
across nodes they are broadcast from the ranks that read them.

Not thread-safe: call from the training thread only.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ftrain import envvars, faults
from ftrain.checkpoint import codec, dtensors, format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.lease import Fence, Lease, for_writer
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import read_shard_record, read_shard_tensors
from ftrain.checkpoint.snapshot import Snapshot, StagingArena, owners, persist, take_snapshot
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.checkpoint.writer import BackgroundWriter
from ftrain.config import CheckpointConfig
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint, FtrainError, StateMismatch
from ftrain.session import replication
from ftrain.session.collectives import Collectives
from ftrain.session.reading import RankReader, Targets, specs_of
from ftrain.session.record import WorkerEvents
from ftrain.session.tiers import LOCAL, REMOTE, RemoteTier

log = logging.getLogger("ftrain")


@dataclass
class Restored:
    """A checkpoint every rank verified: its trees decoded (fresh tensors filled; registered ones not yet)."""

    manifest: Manifest
    trees: dict[str, Any]
    reader: RankReader

    def finish(self) -> None:
        """Phase two of a load: read into the registered tensors themselves. Collective across nodes."""
        try:
            self.reader.fill(live=True)
        finally:
            self.reader.close()

    def abandon(self) -> None:
        self.reader.close()


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, coll: Collectives, events: WorkerEvents | None = None) -> None:
        self.cfg = cfg
        self.coll = coll
        self.rank, self.world_size = coll.rank, coll.world_size
        # Shards are written to the local filesystem (a remote tier, later, receives committed checkpoints).
        self.local = LocalStorage(cfg.dir)
        self.store = CheckpointStore(cfg.dir, self.local)
        self.arena = StagingArena()
        self.writer = BackgroundWriter()
        self.nonce: str | None = None
        #: Rank 0: the lease of the root it holds, or the launcher's it checks (docs/FORMAT.md, "Lease").
        self.lease: Lease | Fence | None = None
        #: Blocking time of the last save on this rank (snapshot only, when asynchronous).
        self.last_blocking_seconds = 0.0
        #: The remote tier (``checkpoint.remote``), if configured: uploads after commits, fetches on restore.
        self.tier = RemoteTier(cfg, coll, self.store, events) if cfg.remote else None
        self.events = events

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Collective, once: check the dir is writable, clean leftovers (rank 0), agree on a save nonce.

        The nonce names this job attempt's temp directories, so shards left by a
        killed attempt can never be mistaken for this attempt's.
        """
        self.coll.setup()
        err: FtrainError | None = None
        try:
            self.store.ensure_writable()
            if self.rank == 0:
                if self.lease is None:  # before anything in the root is touched: it may be another job's
                    self.lease = self._take_lease()
                self.store.cleanup_temps()
                if self.tier is not None:
                    self.tier.start()
                existing = self.store.steps()
                if self.cfg.resume == "never" and existing:
                    raise CheckpointDirError(
                        f"checkpoint.resume is 'never' but {self.store.root} already holds checkpoints (up to step "
                        f"{existing[-1]}); point checkpoint.dir at an empty directory, delete them, or resume")
        except FtrainError as e:
            err = e
        except OSError as e:
            err = CheckpointDirError(f"cannot prepare checkpoint dir {self.store.root}: {e}")
        self.coll.check_all(err)
        (nonce,) = self.coll.broadcast([secrets.randbits(56)])
        self.nonce = f"{nonce:014x}"

    # ---------------------------------------------------------------- restore
    def restore(self, check: Callable[[Manifest, dict[str, Any] | None], None],
                candidates: Iterator[Manifest] | None = None, targets: Callable[[], Targets] | None = None,
                ) -> Restored | None:
        """The newest checkpoint every rank could read, verify and fit, decoded; None if there is none.

        Rank 0 proposes candidates newest first (or in the order of ``candidates``,
        which only rank 0's matters). Each rank then, touching nothing registered:

        1. ``check(manifest, None)``: the manifest's layout fits this run;
        2. reads and verifies its shard records (the state trees) and calls
           ``check(manifest, trees)`` with every tensor still a
           :class:`~ftrain.session.validation.TensorSpec`: the state fits the
           registered objects, before any tensor byte is allocated;
        3. plans its reads (``reading.RankReader``: the tensors ``targets()`` offers, the registered ones, are read
           into in place) and verifies every block it is responsible for, filling fresh tensors on the way.

        After the ranks agree, fresh tensors are complete and the trees decoded; ``Restored.finish()`` reads
        into the registered tensors (phase two of a load: call it once phase one succeeded on every rank).

        ``check`` raises :class:`CorruptCheckpoint` (damage) or
        :class:`StateMismatch` (well-formed, but for another model). The ranks
        agree: damage on any rank makes all fall back to the next candidate; a
        mismatch (in a checkpoint whose files verify) raises on every rank.
        """
        both: Iterator[tuple[Manifest, int]] = iter(())
        if self.rank == 0:
            if candidates is not None:  # an explicit order (load_best): the local tier's
                both = ((m, LOCAL) for m in candidates)
            elif self.tier is not None:
                both = self.tier.candidates(self.store.candidates())
            else:
                both = ((m, LOCAL) for m in self.store.candidates())
        while True:
            proposal, tier = next(both, (None, LOCAL)) if self.rank == 0 else (None, LOCAL)
            step, tier = self.coll.broadcast([proposal.step if proposal else -1, tier])
            if step < 0:
                return None
            damage: CorruptCheckpoint | None = None
            mismatch: StateMismatch | None = None
            if tier == REMOTE:  # collective: every rank fetches its files, or all fall back together
                assert self.tier is not None and self.nonce is not None
                try:
                    proposal = self.tier.fetch(step, proposal, self.nonce)
                except CorruptCheckpoint as e:
                    log.warning("skipping remote checkpoint step %d: %s: %s; falling back to an older one", step,
                                e.path, e.reason)
                    continue
            reader: RankReader | None = None
            try:
                manifest = proposal or self.store.read_manifest(step)
                check(manifest, None)  # the same manifest on every rank, so the same verdict
                records = self._read_records(manifest)
                check(manifest, self._decode(manifest, records, specs_of(manifest).__getitem__))
                reader = RankReader(manifest, self.local, self.coll, single_node=self._single_node(),
                                    targets=targets() if targets else {})
                reader.verify()
            except CorruptCheckpoint as e:
                damage = e
            except StateMismatch as e:
                mismatch = e
                try:  # a mismatch counts only in a checkpoint whose files verify; otherwise it is damage
                    self._verify_files(manifest)
                except CorruptCheckpoint as e2:
                    damage, mismatch = e2, None
            damaged, mismatched = self.coll.any(damage is not None, mismatch is not None)
            if damage is not None:
                log.warning("skipping checkpoint step %d: %s: %s; falling back to an older one", step, damage.path,
                            damage.reason)
            if (damaged or mismatched) and reader is not None:
                reader.close()
            if damaged:
                continue
            if mismatched:
                raise mismatch or StateMismatch(f"checkpoint step {step} does not fit the registered state on "
                                                "another rank; see its log")
            break
        assert reader is not None
        try:
            reader.fill(live=False)  # fresh tensors: what phase one of the load (with its undo) needs
        except BaseException:
            reader.close()
            raise
        return Restored(manifest, self._decode(manifest, records, reader.values()), reader)

    def _read_records(self, manifest: Manifest) -> dict[str, Any]:
        """The replicated tree and the per-rank trees of the saving ranks this rank takes over, from the verified
        shard records."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        record0 = read_shard_record(storage, ckpt, manifest, 0)
        trees = {REPLICATED: record0.trees.get(REPLICATED)}
        sources = range(manifest.world_size) if manifest.world_size != self.world_size else [self.rank]
        for r in sources:
            record = record0 if r == 0 else read_shard_record(storage, ckpt, manifest, r)
            trees[rank_key(r)] = record.trees.get(rank_key(r))
        for key, tree in trees.items():
            if tree is None:
                owner = 0 if key == REPLICATED else int(key.rsplit("-", 1)[-1])
                raise CorruptCheckpoint(storage.describe(f"{ckpt}/{format.shard_names(owner)[0]}"),
                                        f"state tree {key!r} missing")
        return trees

    def _decode(self, manifest: Manifest, records: dict[str, Any], lookup: Callable[[str], Any]) -> dict[str, Any]:
        try:
            # Per object, as encoded: an alias decodes to the very tensor (or TensorSpec) it names.
            return {key: codec.decode_objects(tree, lookup) for key, tree in records.items()}
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise CorruptCheckpoint(str(self.store.path(manifest.step)),
                                    f"malformed state tree ({type(e).__name__}: {e})") from None

    def _verify_files(self, manifest: Manifest) -> None:
        """Checksum this rank's own shard file (or shard 0's after a resize) without keeping any tensor."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        rank = self.rank if manifest.world_size == self.world_size else 0
        read_shard_record(storage, ckpt, manifest, rank)
        read_shard_tensors(storage, ckpt, manifest, rank, keep=lambda n: False)

    def _single_node(self) -> bool:
        return int(os.environ.get(envvars.LOCAL_WORLD_SIZE, "0")) == self.world_size

    # ------------------------------------------------------------------- save
    def save(self, step: int, replicated: dict[str, Any], per_rank: dict[str, Any], meta: dict[str, Any], *,
             blocking: bool, best: Sequence[int] = (), pinned: Collection[str] = ()) -> None:
        """Checkpoint ``step``. Collective in the sense that every rank must call it for the same step.

        ``pinned``: replicated tensor names rank 0 writes (the buffers of replicated modules, see
        ``Registry.capture``); with ``checkpoint.check_replicated`` the rest is compared across ranks first.

        ``best`` lists the steps retention must keep besides the ``keep_last``
        newest, best first; ``best`` on disk points at the first. Asynchronous
        unless ``blocking`` or ``checkpoint.async_save`` is false: returns after
        the snapshot; errors surface later via :meth:`take_error`. Synchronous:
        returns when the checkpoint is committed, or raises on every rank.
        """
        assert self.nonce is not None, "setup() first"
        self.writer.wait()  # one save in flight; the session has already settled the previous one
        t0 = time.monotonic()
        tmp = format.tmp_dirname(step, self.nonce)
        best = list(best)
        err: FtrainError | None = None
        snap: Snapshot | None = None
        rep_tensors: dict[str, torch.Tensor] | None = None
        try:
            faults.point("save.begin", step=step, rank=self.rank)
            # One alias scope per object (tied weights stored once, never across objects): docs/FORMAT.md.
            rep_tree, rep_tensors = codec.encode_objects(replicated, REPLICATED)
            snap = self._snapshot(step, rep_tree, rep_tensors, per_rank, pinned)
            self.local.makedir(tmp)
        except (FtrainError, OSError, TypeError, ValueError) as e:
            err = _as_error(e, step, tmp, self.store)
        if self.cfg.check_replicated:  # every rank, even one that failed above: the check is collective
            try:
                whole = (None if err is not None or rep_tensors is None else  # shards differ by design
                         {n: t for n, t in rep_tensors.items() if not dtensors.is_dtensor(t)})
                replication.check(self.coll, whole, pinned, step)
            except StateMismatch as e:
                err = e  # the same verdict on every rank: all fail this save below, with this message
        self.last_blocking_seconds = time.monotonic() - t0
        if self.cfg.async_save and not blocking:
            if err is not None:
                self._report_failure(tmp, err)  # other ranks' writers are running: let rank 0 stop waiting
                raise err  # nothing was submitted; this rank fails now, with the reason
            assert snap is not None
            self.writer.submit(lambda: self._persist_and_commit(snap, tmp, meta, best, t0),
                               name=f"ftrain-save-{step}")
            return
        try:
            self.coll.check_all(err)
            assert snap is not None
            self.coll.check_all(_failure(lambda: persist(snap, self.local, tmp), step, tmp, self.store))
            # Every shard is durable here. Rank 0 commits; the others learn whether it worked.
            self.coll.check_all(_failure(lambda: self._commit(tmp, step, meta, best, t0), step, tmp,
                                         self.store) if self.rank == 0 else None)
        except FtrainError:
            if self.rank == 0:  # every rank has stopped writing by now (they agreed above)
                self.local.delete(tmp)
            raise
        self.last_blocking_seconds = time.monotonic() - t0

    def _snapshot(self, step: int, rep_tree: Any, rep_tensors: dict[str, torch.Tensor], per_rank: dict[str, Any],
                  pinned: Collection[str]) -> Snapshot:
        own_tree, own_tensors = codec.encode_objects(per_rank, rank_key(self.rank))
        sharded = {n: t for n, t in rep_tensors.items() if dtensors.is_dtensor(t)}  # each rank its own chunks
        whole = {n: t for n, t in rep_tensors.items() if n not in sharded}
        # Pinned tensors go to rank 0: the buffers of replicated modules, which only rank 0 holds right (its are
        # what DDP broadcasts at the next forward), so a resume is exact and an export holds rank 0's buffers.
        split = owners({n: t.numel() * t.element_size() for n, t in whole.items()}, self.world_size, pinned)
        tensors = {n: t for n, t in whole.items() if split[n] == self.rank}
        tensors.update(own_tensors)
        trees = {rank_key(self.rank): own_tree}
        if self.rank == 0:  # the replicated structure is the same everywhere: rank 0 records it
            trees[REPLICATED] = rep_tree
        return take_snapshot(trees, tensors, rank=self.rank, step=step, nonce=self.nonce or "", arena=self.arena,
                             sharded=sharded)

    def _persist_and_commit(self, snap: Snapshot, tmp: str, meta: dict[str, Any], best: list[int],
                            t0: float) -> None:
        try:
            persist(snap, self.local, tmp)
            if self.rank == 0:
                self._commit(tmp, snap.step, meta, best, t0)
        except BaseException as e:
            self._report_failure(tmp, e)
            raise _as_error(e, snap.step, tmp, self.store) from e

    def _report_failure(self, tmp: str, err: BaseException) -> None:
        if self.rank == 0:
            self.local.delete(tmp)  # never leave a half-written save behind
            return
        try:  # tell the committing rank at once instead of letting it wait for the timeout
            self.local.makedir(tmp)
            self.local.full(f"{tmp}/{format.shard_error_name(self.rank)}").write_text(str(err))
        except OSError:
            pass

    def _commit(self, tmp: str, step: int, meta: dict[str, Any], best: list[int], t0: float) -> Manifest:
        if self.lease is None:  # used again after close(): take the root again (errors fail this save)
            self.lease = self._take_lease()
        lease = self.lease  # checked right before the commit rename: a writer that lost the root never commits
        guard = None if lease is None else lambda: lease.check(f"not committing step {step}")
        manifest = self.store.commit(tmp, step=step, world_size=self.world_size, nonce=self.nonce or "",
                                     timeout=self.cfg.commit_timeout_seconds, meta=meta, guard=guard)
        # Displaced right after the rename: retention (deletions) is the new holder's business. Steps still
        # waiting for their upload are kept: they may be the only copy the remote tier will ever get.
        pending = self.tier.pending() if self.tier is not None else []
        pruned = (self.store.retain(step, self.cfg.keep_last, [*best, *pending]) if lease is None or lease.holds()
                  else [])
        if self.tier is not None:
            self.tier.committed(step, best)
        if self.events is not None:
            self.events.committed(step, time.monotonic() - t0, manifest.total_bytes)
        log.info("saved step %d (%.1f MB, %d file(s)) in %.3fs, training blocked %.3fs%s", step,
                 manifest.total_bytes / 1e6, len(manifest.files), time.monotonic() - t0, self.last_blocking_seconds,
                 f"; pruned {', '.join(map(str, pruned))}" if pruned else "")
        return manifest

    def wait_remote(self, step: int, timeout: float) -> float | None:
        """Rank 0 with a remote tier: when ``step`` became durable remotely (None: failed, or not in ``timeout``).
        Other ranks, or no remote tier: None at once."""
        return self.tier.wait(step, timeout) if self.tier is not None else None

    def close(self, upload_timeout: float | None = None) -> None:
        """Finish the uploads (up to ``upload_timeout``, default ``checkpoint.remote_wait_seconds``), release the
        lease this process holds (rank 0 outside ``ftrain launch``); idempotent; no commit after."""
        if self.tier is not None:
            self.tier.close(self.cfg.remote_wait_seconds if upload_timeout is None else upload_timeout)
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _take_lease(self) -> Lease | Fence:
        """Rank 0: this job's right to write the root (docs/FORMAT.md, "Lease"); LeaseError if another has it."""
        return for_writer(self.cfg.dir, ttl=self.cfg.lease_ttl_seconds, force=self.cfg.takeover,
                          run_id=os.environ.get(envvars.RUN_ID), launcher=_launcher_lease())

    # ---------------------------------------------------------- async status
    def busy(self) -> bool:
        return self.writer.busy()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the in-flight save (if any) is persisted and, on rank 0, committed; False on timeout."""
        return self.writer.wait(timeout)

    def flush(self, timeout: float | None) -> bool:
        """At process exit: wait (up to ``timeout``) for the in-flight save; False if it failed (logged)."""
        if not self.writer.wait(timeout):
            log.error("exiting with a checkpoint write still in flight after %.0fs; it will not commit", timeout)
            return True  # nothing known to have failed; the previous checkpoint stays valid
        err = self.writer.take_error()
        if err is not None:
            log.error("the last checkpoint did not commit: %s", err)
        return err is None

    def has_error(self) -> bool:
        return self.writer.failed()

    def take_error(self) -> BaseException | None:
        return self.writer.take_error()

    def raise_pending(self) -> None:
        err = self.writer.take_error()
        if err is not None:
            raise err if isinstance(err, FtrainError) else CheckpointError(f"background checkpoint write failed: {err}")


def _launcher_lease() -> tuple[str, int, int | None] | None:
    """(root, generation, pid) of the lease ``ftrain launch`` holds for this job, from its environment."""
    gen, root, pid = (os.environ.get(v, "") for v in (envvars.LEASE_GENERATION, envvars.LEASE_DIR,
                                                      envvars.LAUNCHER_PID))
    return (root, int(gen), int(pid) if pid.isdigit() else None) if gen.isdigit() and root else None


def _failure(fn: Callable[[], object], step: int, tmp: str, store: CheckpointStore) -> FtrainError | None:
    """Run ``fn``; return its failure as an error value, not raised, so the ranks can agree first."""
    try:
        fn()
    except (FtrainError, OSError, TypeError, ValueError) as e:
        return _as_error(e, step, tmp, store)
    return None


def _as_error(e: BaseException, step: int, tmp: str, store: CheckpointStore) -> FtrainError:
    if isinstance(e, FtrainError):
        return e
    if isinstance(e, OSError):
        where = e.filename or store.storage.describe(tmp)
        return CheckpointError(f"saving step {step} failed writing {where}: {e.strerror or e} (disk full, quota, "
                               f"file size limit or permissions?); {_what_is_left(store, step)}")
    return CheckpointError(f"saving step {step} failed: {type(e).__name__}: {e}")


def _what_is_left(store: CheckpointStore, step: int) -> str:
    """What a failed save left behind, as far as can be seen now (the root itself may be gone)."""
    if not store.root.is_dir():
        return f"the checkpoint dir {store.root} is gone (deleted or unmounted?): no checkpoint is left there"
    try:
        older = [s for s in store.steps() if s < step]
    except OSError as e:
        return f"the checkpoint dir {store.root} cannot be listed ({e.strerror or e})"
    if not older:
        return f"no earlier checkpoint is in {store.root}"
    return f"the previous checkpoint (step {older[-1]}) in {store.root} is untouched"
