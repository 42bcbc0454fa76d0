"""The training-script API: register state, restore, and save on a schedule.

A script becomes fault tolerant with a few lines::

    session = ftrain.Session()                      # config from YAML / env / overrides
    session.register(model=model, optimizer=opt, scheduler=sched, loader=loader)
    start = session.restore()                       # newest valid checkpoint, or 0
    for step in range(start, total_steps):
        train_one_step()
        session.step(step + 1)                      # saves when the schedule says so

``step`` counts *completed* optimizer steps: a checkpoint at step N holds the
state after N steps, and ``restore()`` returning N means "run step N+1 next".

Process model: one Session per process. All ranks of a job must call
``restore``, ``step`` and ``save`` at the same points (they use collectives).
Not thread-safe.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ftrain import envvars, exitcodes, faults, rng
from ftrain.attempt import EXITING, RESTORING, SAVING, STARTING, STEPPING
from ftrain.checkpoint import codec, layout
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import read_shard, write_shard
from ftrain.checkpoint.store import CheckpointStore
from ftrain.config import FtrainConfig, load_config
from ftrain.errors import (
    CheckpointDirError,
    CheckpointError,
    CorruptCheckpoint,
    FtrainError,
    NoValidCheckpoint,
    StateMismatch,
)
from ftrain.stateful import Stateful
from ftrain.worker import Preempted, Worker

log = logging.getLogger("ftrain")
T = TypeVar("T")

_RESERVED = frozenset({"rng"})
REPLICATED = "replicated"


def _rank_key(rank: int) -> str:
    return f"rank-{rank:05d}"


class Session:
    """Owns the checkpoint schedule and the save/restore protocol for one training process."""

    def __init__(self, config: FtrainConfig | None = None, *, config_path: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config if config is not None else load_config(config_path, overrides=overrides)
        self.ckpt = self.config.checkpoint
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank = int(os.environ.get(envvars.RANK, "0"))
            self.world_size = int(os.environ.get(envvars.WORLD_SIZE, "1"))
        _setup_logging(self.rank)
        sup = self.config.supervisor
        self.worker = Worker(self.rank, list(sup.preemption_signals), sup.grace_seconds)
        self.worker.beat(STARTING, 0)
        self.store = CheckpointStore(self.ckpt.dir)
        self._objects: dict[str, tuple[Stateful, bool]] = {}
        self._group: Any = None
        self._nonce: str | None = None
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()

    # ---------------------------------------------------------------- registry
    def register(self, name: str | None = None, obj: Stateful | None = None, *, per_rank: bool | None = None,
                 **named: Stateful) -> None:
        """Register stateful objects, by keyword (``model=m``) or as ``register("model", m)``.

        Objects are *replicated* (identical on every rank, e.g. a DDP model and
        its optimizer: written once) unless ``per_rank=True`` or they are an
        ftrain loader/sampler, whose position differs per rank.
        """
        if name is not None:
            named = {name: obj, **named}  # type: ignore[dict-item]
        for key, o in named.items():
            if not key or "/" in key or key in _RESERVED:
                raise FtrainError(f"cannot register state under the name {key!r}: names must be non-empty, "
                                  f"without '/', and not one of {sorted(_RESERVED)}")
            if not isinstance(o, Stateful):
                raise FtrainError(f"cannot register {key!r}: a {type(o).__name__} has no state_dict()/"
                                  "load_state_dict(); wrap plain values in ftrain.Counters")
            self._objects[key] = (o, _default_per_rank(o) if per_rank is None else per_rank)

    # ------------------------------------------------------------ collectives
    def _setup_group(self) -> None:
        if self.world_size == 1 or self._group is not None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise FtrainError(f"WORLD_SIZE={self.world_size} but torch.distributed is not initialized: call "
                              "torch.distributed.init_process_group() before creating the ftrain Session")
        # Our small control messages travel on CPU tensors; NCCL cannot carry those, so use a gloo side group.
        self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _broadcast(self, values: list[int]) -> list[int]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(t, src=0, group=self._group)
        return t.tolist()

    def _any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return bool(t.item())

    def _any_each(self, *flags: bool) -> tuple[bool, ...]:
        """Element-wise "any rank" of several flags, in one collective."""
        if self.world_size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return tuple(bool(v) for v in t.tolist())

    def _check_all(self, err: FtrainError | None) -> None:
        """Raise on every rank if any rank failed, so no rank is left waiting in a collective."""
        if self._any(err is not None):
            raise err or CheckpointError("another rank failed while preparing checkpoints; see its log")

    # ----------------------------------------------------------------- restore
    def _setup(self) -> None:
        """Collective, once: check the dir is writable, clean leftovers (rank 0), agree on a save nonce.

        The nonce names this job attempt's temp directories, so shards left by a
        killed attempt can never be mistaken for this attempt's.
        """
        self._setup_group()
        err: FtrainError | None = None
        try:
            self.store.ensure_writable()
            if self.rank == 0:
                self.store.cleanup_temps()
                existing = self.store.step_dirs()
                if self.ckpt.resume == "never" and existing:
                    raise CheckpointDirError(
                        f"checkpoint.resume is 'never' but {self.store.root} already holds checkpoints (up to step "
                        f"{existing[-1][0]}); point checkpoint.dir at an empty directory, delete them, or resume")
        except FtrainError as e:
            err = e
        except OSError as e:
            err = CheckpointDirError(f"cannot prepare checkpoint dir {self.store.root}: {e}")
        self._check_all(err)
        (nonce,) = self._broadcast([secrets.randbits(62)])
        self._nonce = f"{nonce:016x}"

    def restore(self) -> int:
        """Load the newest valid checkpoint into the registered objects; return its step, or 0 if none.

        Rank 0 proposes the newest checkpoint whose manifest and file sizes check
        out; every rank then reads the files it needs, verifying checksums as it
        reads (so each byte is read once); if any rank finds damage, all ranks
        fall back to the next older one together. State is loaded only after all
        ranks have read a valid checkpoint. ``checkpoint.resume: required`` makes
        "none valid" an error; ``never`` refuses a directory that has checkpoints.
        """
        t0 = time.monotonic()
        self.worker.beat(RESTORING, 0)
        self._setup()
        candidates = self.store.candidates() if self.rank == 0 else iter(())
        while True:
            manifest = next(candidates, None) if self.rank == 0 else None
            (step,) = self._broadcast([manifest.step if manifest else -1])
            if step < 0:
                return self._start_fresh()
            err: CorruptCheckpoint | None = None
            try:
                manifest = manifest or self.store.read_manifest(step)
                self._check_layout(manifest)
                trees = self._read_trees(manifest)
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint step %d: %s: %s; falling back to an older one", step, e.path,
                            e.reason)
                err = e
            if not self._any(err is not None):
                break
        self._load(trees, manifest)
        faults.point("restore.end", step=step, rank=self.rank)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        self.worker.beat(STEPPING, step)
        log.info("restored step %d from %s in %.3fs", step, self.store.path(step), time.monotonic() - t0)
        return step

    def _start_fresh(self) -> int:
        if self.ckpt.resume == "required":
            raise NoValidCheckpoint(f"checkpoint.resume is 'required' but no valid checkpoint is in "
                                    f"{self.store.root}; run `ftrain ckpt ls {self.store.root}` to see why")
        log.info("no valid checkpoint in %s: starting fresh at step 0", self.store.root)
        self._last_save_time = time.monotonic()
        self.worker.beat(STEPPING, 0)
        return 0

    def _check_layout(self, manifest: Manifest) -> None:
        """Refuse (on every rank alike: they all read the same manifest) state this run cannot take exactly."""
        if manifest.world_size != self.world_size:
            raise StateMismatch(f"checkpoint step {manifest.step} was written by {manifest.world_size} rank(s); this "
                                f"run has {self.world_size}. Per-rank RNG and data positions cannot be mapped exactly: "
                                "relaunch with the original number of processes")
        saved_rep = set(manifest.meta.get("replicated") or ())
        saved_all = saved_rep | set(manifest.meta.get("per_rank") or ())
        missing, new = sorted(saved_all - set(self._objects)), sorted(set(self._objects) - saved_all)
        moved = sorted(k for k, (_, p) in self._objects.items() if k in saved_all and (k in saved_rep) == p)
        if missing or new or moved:
            raise StateMismatch(f"checkpoint step {manifest.step} does not match the registered state (missing: "
                                f"{missing}, new: {new}, per_rank changed: {moved}); register the same objects, "
                                "with the same per_rank choices, as the run that saved it")

    def _read_trees(self, manifest: Manifest) -> dict[str, Any]:
        """Read, verify and decode rank 0's shard (replicated state) and this rank's shard."""
        trees: dict[str, Any] = {}
        for rank in sorted({0, self.rank}):
            record, tensors = read_shard(self.store.path(manifest.step), manifest, rank)
            for key in (REPLICATED, _rank_key(self.rank)):
                if key in record.trees:
                    try:
                        trees[key] = codec.decode(record.trees[key], tensors.__getitem__)
                    except (CheckpointError, KeyError, TypeError, ValueError, RecursionError) as e:
                        path = self.store.path(manifest.step) / layout.shard_names(rank)[0]
                        raise CorruptCheckpoint(str(path), f"malformed state tree {key!r} ({e})") from None
        if REPLICATED not in trees or _rank_key(self.rank) not in trees:
            raise CorruptCheckpoint(str(self.store.path(manifest.step)), f"no state for rank {self.rank}")
        return trees

    def _load(self, trees: dict[str, Any], manifest: Manifest) -> None:
        replicated, mine = trees[REPLICATED], trees[_rank_key(self.rank)]
        for key, (obj, per_rank) in self._objects.items():
            obj.load_state_dict((mine if per_rank else replicated)[key])
        rng.restore(mine["rng"])  # last: loading other state must not disturb the restored streams

    # -------------------------------------------------------------------- save
    def step(self, step: int) -> bool:
        """Call once per completed step on every rank; saves when ``every_steps``/``every_seconds`` fall due.

        Also where preemption is acted on: if any rank received a preemption
        signal, every rank saves at this same step and raises :class:`Preempted`
        (a ``SystemExit`` with code 75).
        """
        if self._nonce is None:
            log.warning("Session.step() called before restore(): starting without resuming")
            self._setup()
        self.worker.beat(STEPPING, step)
        faults.point("step", step=step, rank=self.rank)
        due = self.ckpt.every_steps > 0 and step % self.ckpt.every_steps == 0
        time_due = self.ckpt.every_seconds > 0 and time.monotonic() - self._last_save_time >= self.ckpt.every_seconds
        # One small collective per step makes every rank take the same decision: clocks and signal
        # delivery differ per rank, and a rank that saved or exited alone would deadlock the others.
        time_due, preempt = self._any_each(time_due, self.worker.preempt_requested)
        if preempt:
            self.save(step)
            self.worker.write_preempted_marker(step)
            log.warning("preempted (%s): checkpoint of step %d committed; exiting with code %d",
                        self.worker.preempt_reason or "another rank was signalled", step, exitcodes.PREEMPTED)
            self.worker.beat(EXITING, step)
            raise Preempted(step)
        if due or time_due:
            self.save(step)
        return due or time_due

    def save(self, step: int) -> None:
        """Write a checkpoint of the registered state at ``step`` now (collective: call on every rank).

        Either every rank returns and checkpoint ``step`` is committed, or every
        rank raises :class:`CheckpointError` and nothing new is left on disk.
        """
        if self._nonce is None:
            self._setup()
        if step == self.last_saved_step:
            return  # e.g. a final save right after a scheduled one: the state is the same
        self.worker.beat(SAVING, step)
        t0 = time.monotonic()
        assert self._nonce is not None
        tmp = self.store.root / layout.tmp_dirname(step, self._nonce)
        try:
            self._check_all(self._guard(step, tmp, lambda: self._write_shard(step, tmp)))
            # Every shard is durable here. Rank 0 commits; the others learn whether it worked.
            manifest = self._guard(step, tmp, lambda: self._commit(step, tmp)) if self.rank == 0 else None
            self._check_all(manifest if isinstance(manifest, FtrainError) else None)
        except FtrainError:
            if self.rank == 0:  # every rank has stopped writing by now (they agreed above)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank == 0 and isinstance(manifest, Manifest):
            log.info("saved step %d (%.1f MB, %d file(s)) in %.3fs", step, manifest.total_bytes / 1e6,
                     len(manifest.files), time.monotonic() - t0)
        faults.point("save.end", step=step, rank=self.rank)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        self.worker.beat(STEPPING, step)

    def _guard(self, step: int, tmp: Path, fn: Callable[[], T]) -> T | FtrainError:
        """Run ``fn``; return its result, or its failure as an error value (not raised: the ranks agree first)."""
        try:
            return fn()
        except FtrainError as e:
            return e
        except (OSError, TypeError, ValueError) as e:
            where = getattr(e, "filename", None) or tmp
            return CheckpointError(
                f"saving step {step} failed writing {where}: {getattr(e, 'strerror', None) or e} (disk full, quota, "
                f"file size limit or permissions?); the previous checkpoint in {self.store.root} is untouched")

    def _write_shard(self, step: int, tmp: Path) -> None:
        faults.point("save.begin", step=step, rank=self.rank)
        trees: dict[str, Any] = {_rank_key(self.rank): {"rng": rng.capture()}}
        if self.rank == 0:
            trees[REPLICATED] = {}
        for key, (obj, per_rank) in self._objects.items():
            if per_rank:
                trees[_rank_key(self.rank)][key] = obj.state_dict()
            elif self.rank == 0:  # replicated state is identical everywhere: rank 0 writes it
                trees[REPLICATED][key] = obj.state_dict()
        tmp.mkdir(exist_ok=True)
        write_shard(tmp, rank=self.rank, step=step, nonce=self._nonce or "", trees=trees)

    def _commit(self, step: int, tmp: Path) -> Manifest:
        meta = {"replicated": sorted(k for k, (_, p) in self._objects.items() if not p),
                "per_rank": sorted(k for k, (_, p) in self._objects.items() if p)}
        manifest = self.store.commit(tmp, step=step, world_size=self.world_size, nonce=self._nonce or "",
                                     timeout=self.ckpt.commit_timeout_seconds, meta=meta)
        pruned = self.store.prune(self.ckpt.keep_last, protect={step})
        if pruned:
            log.info("pruned checkpoint(s) %s (keep_last=%d)", ", ".join(map(str, pruned)), self.ckpt.keep_last)
        return manifest


def _default_per_rank(obj: object) -> bool:
    from ftrain.data import ResumableLoader, ResumableSampler

    return isinstance(obj, (ResumableLoader, ResumableSampler))


def _setup_logging(rank: int) -> None:
    logger = logging.getLogger("ftrain")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[ftrain r{rank}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False

