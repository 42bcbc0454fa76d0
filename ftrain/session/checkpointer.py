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

Restore: every rank reads and verifies its own shard. On a single node it also
reads the replicated tensors from the other shards (one disk read per node, via
the page cache); across nodes they are broadcast from the ranks that read them.

Not thread-safe: call from the training thread only.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch

from ftrain import envvars, faults
from ftrain.checkpoint import codec, format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.lease import Fence, Lease, for_writer
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import ensure_memory, read_shard_record, read_shard_tensors
from ftrain.checkpoint.snapshot import Snapshot, StagingArena, owners, persist, take_snapshot
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.checkpoint.writer import BackgroundWriter
from ftrain.config import CheckpointConfig
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint, FtrainError, StateMismatch
from ftrain.session import replication
from ftrain.session.collectives import Collectives
from ftrain.session.tiers import LOCAL, REMOTE, RemoteTier
from ftrain.session.validation import TensorSpec

log = logging.getLogger("ftrain")


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, coll: Collectives) -> None:
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
        self.tier = RemoteTier(cfg, coll, self.store) if cfg.remote else None

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
                candidates: Iterator[Manifest] | None = None) -> tuple[Manifest, dict[str, Any]] | None:
        """The newest checkpoint every rank could read, verify and fit, decoded; None if there is none.

        Rank 0 proposes candidates newest first (or in the order of ``candidates``,
        which only rank 0's matters). Each rank then, touching nothing registered:

        1. ``check(manifest, None)``: the manifest's layout fits this run;
        2. reads and verifies its shard records (the state trees) and calls
           ``check(manifest, trees)`` with every tensor still a
           :class:`~ftrain.session.validation.TensorSpec`: the state fits the
           registered objects, before any tensor byte is allocated;
        3. reads its tensors, verifying checksums.

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
            try:
                manifest = proposal or self.store.read_manifest(step)
                check(manifest, None)  # the same manifest on every rank, so the same verdict
                records = self._read_records(manifest)
                check(manifest, self._decode(manifest, records, _specs(manifest)))
                self._check_memory(manifest)
                tensors = self._read_tensors(manifest)
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
            if damaged:
                continue
            if mismatched:
                raise mismatch or StateMismatch(f"checkpoint step {step} does not fit the registered state on "
                                                "another rank; see its log")
            break
        self._share_replicated(manifest, tensors)
        return manifest, self._decode(manifest, records, tensors)

    def _sources(self, manifest: Manifest) -> list[int]:
        """The saving ranks whose per-rank state this rank needs: its own, or after a resize every one's (each
        per-rank object's ``resize_state`` hook maps them onto this rank)."""
        if manifest.world_size != self.world_size:
            return list(range(manifest.world_size))
        return [self.rank]

    def _reader_of(self, saver: int) -> int:
        """The rank of this run that reads (and, across nodes, broadcasts) the replicated tensors in ``saver``'s
        file: the saver itself at the same world size; after a resize they are dealt round-robin."""
        return saver % self.world_size

    def _read_records(self, manifest: Manifest) -> dict[str, Any]:
        """The replicated tree and the per-rank trees of :meth:`_sources`, from the verified shard records."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        record0 = read_shard_record(storage, ckpt, manifest, 0)
        trees = {REPLICATED: record0.trees.get(REPLICATED)}
        for r in self._sources(manifest):
            record = record0 if r == 0 else read_shard_record(storage, ckpt, manifest, r)
            trees[rank_key(r)] = record.trees.get(rank_key(r))
        for key, tree in trees.items():
            if tree is None:
                owner = 0 if key == REPLICATED else int(key.rsplit("-", 1)[-1])
                raise CorruptCheckpoint(storage.describe(f"{ckpt}/{format.shard_names(owner)[0]}"),
                                        f"state tree {key!r} missing")
        return trees

    def _decode(self, manifest: Manifest, records: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        try:
            # Per object, as encoded: an alias decodes to the very tensor (or TensorSpec) it names.
            return {key: codec.decode_objects(tree, tensors.__getitem__) for key, tree in records.items()}
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise CorruptCheckpoint(str(self.store.path(manifest.step)),
                                    f"malformed state tree ({type(e).__name__}: {e})") from None

    def _my_files(self, manifest: Manifest) -> list[tuple[int, Callable[[str], bool]]]:
        """The saving ranks whose .bin files this rank reads, each with the tensors it keeps from it.

        Its own file (at the same world size); the replicated tensors of the files it is the reader of; on one
        node every file's replicated tensors (the page cache makes that one disk read per node, faster than
        broadcasting: docs/PERFORMANCE.md); after a resize every saver's per-rank tensors.
        """
        single = self._single_node()
        sources = set(self._sources(manifest))
        out: list[tuple[int, Callable[[str], bool]]] = []
        for r in range(manifest.world_size):
            own = r in sources
            rep = single or self._reader_of(r) == self.rank
            if r == self.rank and manifest.world_size == self.world_size:
                out.append((r, lambda n: True))
            elif own or rep:
                out.append((r, _keeper(rank_key(r) if own else None, rep)))
        out.sort(key=lambda item: item[0] != self.rank)  # its own file first: that is what _verify_files checks
        return out

    def _check_memory(self, manifest: Manifest) -> None:
        """Refuse (as damage) a checkpoint that declares more tensor bytes than this host could hold, in total
        over the tensors this rank keeps (each read checks its own file too)."""
        keeps = {format.shard_names(r)[1]: keep for r, keep in self._my_files(manifest)}
        ensure_memory(sum(t.nbytes for n, t in manifest.tensors.items() if t.file in keeps and keeps[t.file](n)),
                      str(self.store.path(manifest.step)))

    def _read_tensors(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        tensors: dict[str, torch.Tensor] = {}
        for rank, keep in self._my_files(manifest):  # every file is verified as read
            tensors.update(read_shard_tensors(storage, ckpt, manifest, rank, keep=keep))
        return tensors

    def _verify_files(self, manifest: Manifest) -> None:
        """Checksum the first shard file this rank reads without keeping (or allocating) any tensor."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        for rank, _ in self._my_files(manifest)[:1]:
            read_shard_record(storage, ckpt, manifest, rank)
            read_shard_tensors(storage, ckpt, manifest, rank, keep=lambda n: False)

    def _share_replicated(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
        """Multi-node: give every rank the replicated tensors that ranks elsewhere read (each file read once)."""
        if self.world_size == 1 or self._single_node():
            return
        for name, entry in sorted(manifest.tensors.items()):
            if not name.startswith(f"{REPLICATED}/"):
                continue
            reader = self._reader_of(manifest.files[entry.file].rank)
            if reader != self.rank:
                tensors[name] = torch.empty(entry.shape, dtype=codec.dtype_from_name(entry.dtype))
            self.coll.broadcast_tensor(tensors[name], src=reader)

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
                replication.check(self.coll, rep_tensors if err is None else None, pinned, step)
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
        # Pinned tensors go to rank 0: the buffers of replicated modules, which only rank 0 holds right (its are
        # what DDP broadcasts at the next forward), so a resume is exact and an export holds rank 0's buffers.
        split = owners({n: t.numel() * t.element_size() for n, t in rep_tensors.items()}, self.world_size, pinned)
        tensors = {n: t for n, t in rep_tensors.items() if split[n] == self.rank}
        tensors.update(own_tensors)
        trees = {rank_key(self.rank): own_tree}
        if self.rank == 0:  # the replicated structure is the same everywhere: rank 0 records it
            trees[REPLICATED] = rep_tree
        return take_snapshot(trees, tensors, rank=self.rank, step=step, nonce=self.nonce or "", arena=self.arena)

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


def _keeper(per_rank: str | None, replicated: bool) -> Callable[[str], bool]:
    """Which tensors of one shard file to keep: its replicated ones, and/or the per-rank ones under ``per_rank``."""
    prefixes = tuple(p + "/" for p in ((REPLICATED,) if replicated else ()) + ((per_rank,) if per_rank else ()))
    return lambda name: name.startswith(prefixes)


def _specs(manifest: Manifest) -> dict[str, TensorSpec]:
    """Every tensor of the manifest as a description, to check the trees before any byte is read."""
    return {n: TensorSpec(t.shape, codec.dtype_from_name(t.dtype)) for n, t in manifest.tensors.items()}
