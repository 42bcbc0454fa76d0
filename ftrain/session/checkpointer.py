"""Worker side of the checkpoint protocol: every rank saves its share and restores with the others.

Save and restore state trees as sharded, verified checkpoints, synchronously or in the background.

Save = snapshot (training thread: encode, copy tensors into a reused host
buffer) + persist (write, fsync, checksum) + commit across the job's disks
(``commit.py``: every rank's shard record through the job's store, rank 0's
manifest, each disk's leader's rename, the replicas of each disk's files, the
job's commit, then ``latest``, retention and uploads). Replicated state
(identical on every rank) is written once in total: its tensors are split across ranks by
:func:`snapshot.owners` (the buffers of replicated modules all by rank 0: they
differ per rank under DDP, and rank 0's are the ones DDP broadcasts next); each
rank also writes its per-rank state. ``checkpoint.check_replicated`` compares
the rest across ranks first (``replication.py``). With ``checkpoint.async_save``
the persist and commit run in a :class:`BackgroundWriter` thread, which never
touches the training process group; otherwise they run inline and the ranks
agree on success with one small collective.

Whether the ranks share one directory or each node has its own disk is found
out in :meth:`Checkpointer.setup` (``layout.py``; docs/FORMAT.md, "Disks").

Restore: the ranks agree on the newest step they can assemble from every disk
and the remote tier, and bring each disk the files it lacks (``sources.py``);
then every rank verifies the blocks it reads (``reading.py``) and reads each
tensor straight into where it goes: a registered module's own tensors in place,
the local shards of sharded (DTensor) state at any world size. On a single node
it reads the replicated tensors from the page cache (one disk read per node);
across nodes they are broadcast from the ranks that read them, chosen among the
ranks whose disk holds them.

Not thread-safe: call from the training thread only.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ftrain import envvars, faults
from ftrain.checkpoint import codec, disks, dtensors, format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.lease import Fence, Lease, for_writer
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.snapshot import Snapshot, StagingArena, owners, take_snapshot
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.checkpoint.writer import BackgroundWriter
from ftrain.config import CheckpointConfig
from ftrain.errors import (
    CheckpointDirError,
    CheckpointError,
    ConfigError,
    FtrainError,
    StateMismatch,
)
from ftrain.session import exchange, replication
from ftrain.session.collectives import Collectives
from ftrain.session.commit import Keys, SaveProtocol
from ftrain.session.exchange import Exchange
from ftrain.session.layout import Layout
from ftrain.session.peers import Peers
from ftrain.session.reading import Targets
from ftrain.session.record import WorkerEvents
from ftrain.session.replicas import SAFE_KEY, Replicas
from ftrain.session.restorer import Restored, Restorer
from ftrain.session.sources import Sources
from ftrain.session.tiers import RemoteTier

log = logging.getLogger("ftrain")


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, coll: Collectives, events: WorkerEvents | None = None) -> None:
        self.cfg = cfg
        self.coll = coll
        self.rank, self.world_size = coll.rank, coll.world_size
        # Shards are written to this rank's checkpoint root; whether other ranks share it is found out in setup.
        self.local = LocalStorage(cfg.dir)
        self.store = CheckpointStore(cfg.dir, self.local)
        self.arena = StagingArena()
        self.writer = BackgroundWriter()
        self.nonce: str | None = None
        #: A disk's leader: the lease of the root it holds, or the launcher's it checks (docs/FORMAT.md, "Lease").
        self.lease: Lease | Fence | None = None
        #: Blocking time of the last save on this rank (snapshot only, when asynchronous).
        self.last_blocking_seconds = 0.0
        #: The remote tier (``checkpoint.remote.url``), if configured: uploads after commits, a source on restore.
        self.tier = RemoteTier(cfg, self.store, events) if cfg.remote.url else None
        self.events = events
        #: Set up by :meth:`setup`: which rank writes to which disk, the store exchange, the commit protocol.
        self.layout: Layout | None = None
        self.exchange: Exchange | None = None
        self.protocol: SaveProtocol | None = None
        self.sources: Sources | None = None
        #: The newest checkpoint one disk's loss cannot take (replicated, or remote), as found at restore.
        self._safe_at_restore: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Collective, once: check the dir is writable, learn which ranks share it (docs/FORMAT.md, "Disks"),
        agree on a save nonce, and let each disk's leader take its lease and clean leftovers.

        The nonce names this job attempt's temp directories and store keys, so what a killed attempt left can
        never be mistaken for this attempt's.
        """
        self.coll.setup()
        err: FtrainError | None = None
        disk = ""
        try:
            self.store.ensure_writable()
            disk = disks.disk_id(self.local)
        except FtrainError as e:
            err = e
        except OSError as e:
            err = CheckpointDirError(f"cannot prepare checkpoint dir {self.store.root}: {e}")
        self.coll.check_all(err)
        self.store.disk = disk
        layout = self.layout = Layout(self.rank, tuple(b.decode() for b in self.coll.all_gather_bytes(disk.encode())))
        (nonce,) = self.coll.broadcast([secrets.randbits(56)])
        self.nonce = f"{nonce:014x}"
        self._check_shared(layout)
        self.exchange = exchange.for_job(self.world_size, self.nonce)
        restore_peers = replica_peers = None
        if not layout.shared:
            # Every rank takes part in making a group; only the leaders are in these two.
            groups = [dist.new_group(ranks=list(layout.leaders), backend="gloo") for _ in range(2)]
            if layout.is_leader:
                restore_peers, replica_peers = Peers(groups[0]), Peers(groups[1])
        try:
            if layout.is_leader:
                if self.lease is None:  # before anything in the root is touched: it may be another job's
                    self.lease = self._take_lease()
                self.store.cleanup_temps()
                if self.tier is not None:
                    self.tier.start(layout, self.exchange, self._uploaded)
                existing = self.store.steps()
                if self.cfg.resume == "never" and existing:
                    raise CheckpointDirError(
                        f"checkpoint.resume is 'never' but {self.store.root} already holds checkpoints (up to step "
                        f"{existing[-1]}); point checkpoint.dir at an empty directory, delete them, or resume")
            self._check_layout()
        except FtrainError as e:
            err = e
        except OSError as e:
            err = CheckpointDirError(f"cannot prepare checkpoint dir {self.store.root}: {e}")
        self.coll.check_all(err)
        replicas = (Replicas(layout, replica_peers, self.local, self.cfg.replicas)
                    if replica_peers is not None and self.cfg.replicas > 0 else None)
        self.protocol = SaveProtocol(layout, self.exchange, self.store, timeout=self.cfg.commit_timeout_seconds,
                                     guard=self._guard, events=self.events, replicas=replicas)
        self.sources = Sources(layout, self.coll, self.store, self.local, self.tier, restore_peers, self.nonce)

    def _check_shared(self, layout: Layout) -> None:
        """Collective: ranks that claim one disk must see one directory. A directory copied with its ``disk-id``
        (a restored image, ``cp -a`` of a root) would otherwise pass for the same disk as the original, and only
        one of them would ever be committed. Each leader leaves a marker; each rank of its disk looks for it."""
        if layout.world_size == 1:
            return
        marker = f"{format.TMP_PREFIX}disk-{self.nonce}"
        err: FtrainError | None = None
        if layout.is_leader:
            try:
                self.local.write(marker, b"")
            except OSError as e:
                err = CheckpointDirError(f"cannot write in checkpoint dir {self.store.root}: {e}")
        self.coll.barrier()  # every marker exists
        if err is None and not self.local.full(marker).is_file():
            err = CheckpointDirError(
                f"rank {self.rank}'s checkpoint dir {self.store.root} has the disk id of rank "
                f"{layout.leader(layout.my_disk)}'s but is another directory (copied with its {format.DISK_ID} "
                f"file?); remove {self.local.full(format.DISK_ID)} from the copy (a new id is made at the next start)")
        self.coll.barrier()  # everyone looked
        if layout.is_leader:
            self.local.delete(marker)
        self.coll.check_all(err)

    def _check_layout(self) -> None:
        """Rank 0: with node-local disks and nothing to survive a node's loss, say so (or refuse, if a resume is
        required); the same for more replicas than there are other disks."""
        assert self.layout is not None
        disks_ = len(self.layout.order)
        if self.rank != 0 or disks_ == 1:
            return
        log.info("checkpoint.dir is node-local: %d disks (%s); each commits its own ranks' files%s", disks_,
                 ", ".join(self.layout.describe(d) for d in self.layout.order),
                 f", with {min(self.cfg.replicas, disks_ - 1)} replica(s) on other disks" if self.cfg.replicas else "")
        if self.cfg.replicas == 0 and not self.cfg.remote.url:
            msg = (f"checkpoint.dir is a node-local disk on each of {disks_} nodes, with no replicas "
                   "(checkpoint.replicas: 0) and no remote tier (checkpoint.remote.url): losing one node loses every "
                   "checkpoint; set checkpoint.replicas to 1 or more, or checkpoint.remote.url to a bucket")
            if self.cfg.resume == "required":
                raise ConfigError(msg)
            log.warning("%s", msg)
        elif self.cfg.replicas > disks_ - 1:
            log.warning("checkpoint.replicas is %d but there are only %d other disk(s): %d replica(s) of each file",
                        self.cfg.replicas, disks_ - 1, disks_ - 1)

    # ---------------------------------------------------------------- restore
    def restore(self, check: Callable[[Manifest, dict[str, Any] | None], None],
                candidates: Iterator[Manifest] | None = None, targets: Callable[[], Targets] | None = None,
                ) -> Restored | None:
        """The newest checkpoint every rank could read, verify and fit (``restorer.py``); None if there is none.
        Collective."""
        assert self.sources is not None and self.layout is not None, "setup() first"
        restorer = Restorer(self.layout, self.coll, self.local, self.store, self.sources, self._single_node())
        found = restorer.restore(check, candidates, targets)
        self._safe_at_restore = restorer.safe
        return found

    def _single_node(self) -> bool:
        return int(os.environ.get(envvars.LOCAL_WORLD_SIZE, "0")) == self.world_size

    def save(self, step: int, replicated: dict[str, Any], per_rank: dict[str, Any], meta: dict[str, Any], *,
             blocking: bool, best: Sequence[int] = (), pinned: Collection[str] = ()) -> None:
        """Checkpoint ``step``. Collective in the sense that every rank must call it for the same step.

        ``pinned``: replicated tensor names rank 0 writes (the buffers of replicated modules, see
        ``Registry.capture``); with ``checkpoint.check_replicated`` the rest is compared across ranks first.

        ``best`` lists the steps retention must keep besides the ``keep_last``
        newest, best first; ``best`` on disk points at the first. Asynchronous
        unless ``blocking`` or ``checkpoint.async_save`` is false: returns after
        the snapshot; errors surface later via :meth:`take_error`. Synchronous:
        returns when the checkpoint is committed, or raises on every rank. The commit across disks:
        ``commit.py``.
        """
        assert self.nonce is not None and self.protocol is not None, "setup() first"
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
        keys = self.protocol.begin(step)
        if err is not None:
            self.protocol.report_failure(keys, tmp, err)  # the others' writers may be running: stop them waiting
        if self.cfg.async_save and not blocking:
            if err is not None:
                raise err  # nothing was submitted; this rank fails now, with the reason
            assert snap is not None
            self.writer.submit(lambda: self._persist_and_commit(snap, keys, tmp, meta, best, t0),
                               name=f"ftrain-save-{step}")
            return
        if err is None:  # synchronous: every rank does its part here, then the ranks agree on the outcome
            assert snap is not None
            err = _failure(lambda: self._persist_and_commit(snap, keys, tmp, meta, best, t0), step, tmp, self.store)
        self.coll.check_all(err)
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

    def _persist_and_commit(self, snap: Snapshot, keys: Keys, tmp: str, meta: dict[str, Any], best: list[int],
                            t0: float) -> None:
        assert self.protocol is not None
        try:
            self.protocol.run(snap, keys, tmp, meta, t0, lambda: self.last_blocking_seconds,
                              after=lambda step, _m: self._after_commit(step, best))
        except BaseException as e:
            raise _as_error(e, snap.step, tmp, self.store) from e

    def _guard(self, step: int) -> None:
        """A disk's leader, right before its commit rename: a writer that lost the root never commits."""
        if self.lease is None:  # used again after close(): take the root again (errors fail this save)
            self.lease = self._take_lease()
        self.lease.check(f"not committing step {step}")

    def _after_commit(self, step: int, best: list[int]) -> None:
        """A disk's leader, once the job committed ``step``: retention on its disk, then uploads and replicas."""
        lease = self.lease
        # Displaced right after the rename: retention (deletions) is the new holder's business. Steps still
        # waiting for their upload are kept (they may become the only copy a lost disk leaves), and so is the
        # newest safe one (replicated, or remote) until a newer one is.
        keep = self.tier.pending() if self.tier is not None else []
        safe = self._newest_safe()
        if safe is not None:
            keep.append(safe)
        keep_last = self.cfg.retention.keep_last
        pruned = self.store.retain(step, keep_last, best, protect=keep) if lease is None or lease.holds() else []
        if pruned:
            log.debug("pruned checkpoint(s) %s from %s", ", ".join(map(str, pruned)), self.store.root)
        if self.tier is not None:
            self.tier.committed(step, best)

    def _newest_safe(self) -> int | None:
        """The newest step one disk's loss cannot take: replicated on other disks, or on the remote tier."""
        recorded = self.exchange.get(SAFE_KEY) if self.exchange is not None else None
        found = [s for s in (self._safe_at_restore, int(recorded) if recorded else None) if s is not None]
        return max(found) if found else None

    def _uploaded(self, step: int) -> None:
        """Rank 0's uploader thread: ``step`` is durable on the remote tier, so safe against a disk's loss."""
        if self.exchange is not None and (self._newest_safe() or -1) < step:
            self.exchange.set(SAFE_KEY, str(step).encode())

    def wait_remote(self, step: int, timeout: float) -> float | None:
        """Rank 0 with a remote tier: when ``step`` became durable remotely (None: failed, or not in ``timeout``).
        Other ranks, or no remote tier: None at once."""
        return self.tier.wait(step, timeout) if self.tier is not None else None

    def close(self, upload_timeout: float | None = None) -> None:
        """Finish the uploads (up to ``upload_timeout``, default ``checkpoint.remote.wait_seconds``), release the
        lease this process holds (a disk's leader outside ``ftrain launch``); idempotent; no commit after."""
        if self.tier is not None:
            self.tier.close(self.cfg.remote.wait_seconds if upload_timeout is None else upload_timeout)
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _take_lease(self) -> Lease | Fence:
        """A disk's leader: this job's right to write the root (docs/FORMAT.md, "Lease"); LeaseError if another job
        has it."""
        return for_writer(self.cfg.dir, ttl=self.cfg.lease.ttl_seconds, force=self.cfg.lease.takeover,
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
