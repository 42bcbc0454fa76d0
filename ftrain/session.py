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

import json
import logging
import os
import secrets
import shutil
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ftrain import envvars, faults, rng
from ftrain.checkpoint import codec, layout
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import ShardRecord, tensor_from_buffer, write_shard
from ftrain.checkpoint.store import CheckpointStore
from ftrain.config import FtrainConfig, load_config
from ftrain.errors import CheckpointError, FtrainError, NoValidCheckpoint, StateMismatch
from ftrain.stateful import Stateful

log = logging.getLogger("ftrain")

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
            if not key or "/" in key or key in _RESERVED or key.startswith(("rank-", REPLICATED)):
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

    def _check_all(self, err: FtrainError | None) -> None:
        """Raise on every rank if any rank failed, so no rank is left waiting in a collective."""
        if self._any(err is not None):
            raise err or CheckpointError("another rank failed while preparing checkpoints; see its log")

    # ----------------------------------------------------------------- restore
    def _setup(self) -> dict[str, Any] | None:
        """Collective: check the dir, clean leftovers, pick the checkpoint to resume and a save nonce."""
        self._setup_group()
        err: FtrainError | None = None
        try:
            self.store.ensure_writable()
        except FtrainError as e:
            err = e
        self._check_all(err)
        found: tuple[Manifest, dict[str, bytearray]] | None = None
        if self.rank == 0:
            try:
                self.store.cleanup_temps()
                if self.ckpt.resume != "never":
                    found = self.store.newest_valid(keep=set(layout.shard_names(0)))
            except FtrainError as e:
                err = e
        self._check_all(err)
        step, nonce = self._broadcast([found[0].step if found else -1, secrets.randbits(62)])
        self._nonce = f"{nonce:016x}"
        if step < 0:
            return None
        if self.rank == 0 and found:
            return {"manifest": found[0], "buffers": found[1]}
        return {"step": step}

    def restore(self) -> int:
        """Load the newest valid checkpoint into the registered objects; return its step, or 0 if none.

        With ``checkpoint.resume: required`` a missing checkpoint is an error;
        with ``never`` existing checkpoints are ignored.
        """
        t0 = time.monotonic()
        picked = self._setup()
        if picked is None:
            if self.ckpt.resume == "required":
                raise NoValidCheckpoint(f"checkpoint.resume is 'required' but no valid checkpoint is in "
                                        f"{self.store.root}; run `ftrain ckpt ls {self.store.root}` to see why")
            log.info("no valid checkpoint in %s: starting fresh at step 0", self.store.root)
            self._last_save_time = time.monotonic()
            return 0
        if "manifest" in picked:
            manifest, buffers = picked["manifest"], picked["buffers"]
        else:
            manifest = self.store.read_manifest(picked["step"])
            buffers = {}
        if manifest.world_size != self.world_size:
            raise StateMismatch(f"checkpoint step {manifest.step} was written by {manifest.world_size} rank(s); this "
                                f"run has {self.world_size}. Per-rank RNG and data positions cannot be mapped exactly: "
                                "relaunch with the original number of processes")
        need = [*layout.shard_names(0), *layout.shard_names(self.rank)]
        for name in need:
            if name not in buffers:
                buffers[name] = self.store.read_file(manifest.step, name, manifest.files[name])
        trees = self._decode(manifest, buffers)
        self._load(trees, manifest.step)
        faults.point("restore.end", step=manifest.step, rank=self.rank)
        self.last_saved_step = manifest.step
        self._last_save_time = time.monotonic()
        log.info("restored step %d from %s in %.3fs", manifest.step, self.store.path(manifest.step),
                 time.monotonic() - t0)
        return manifest.step

    def _decode(self, manifest: Manifest, buffers: dict[str, bytearray]) -> dict[str, Any]:
        def lookup(name: str) -> torch.Tensor:
            entry = manifest.tensors[name]
            return tensor_from_buffer(buffers[entry.file], entry)

        trees: dict[str, Any] = {}
        for rank in sorted({0, self.rank}):
            rec = ShardRecord.from_json(json.loads(buffers[layout.shard_names(rank)[0]]))
            for key in (REPLICATED, _rank_key(self.rank)):
                if key in rec.trees:
                    trees[key] = codec.decode(rec.trees[key], lookup)
        return trees

    def _load(self, trees: dict[str, Any], step: int) -> None:
        replicated = trees.get(REPLICATED, {})
        mine = trees.get(_rank_key(self.rank), {})
        saved = set(replicated) | (set(mine) - _RESERVED)
        wanted = set(self._objects)
        if saved != wanted:
            raise StateMismatch(f"checkpoint step {step} holds state {sorted(saved)} but this run registered "
                                f"{sorted(wanted)}; register the same objects as the run that saved it "
                                f"(missing: {sorted(saved - wanted)}, new: {sorted(wanted - saved)})")
        for key, (obj, per_rank) in self._objects.items():
            obj.load_state_dict((mine if per_rank else replicated)[key])
        rng.restore(mine["rng"])  # last: loading other state must not disturb the restored streams

    # -------------------------------------------------------------------- save
    def step(self, step: int) -> bool:
        """Call once per completed step on every rank; saves when ``every_steps``/``every_seconds`` fall due."""
        if self._nonce is None:
            self._setup()
        faults.point("step", step=step, rank=self.rank)
        due = self.ckpt.every_steps > 0 and step % self.ckpt.every_steps == 0
        if not due and self.ckpt.every_seconds > 0:
            # Clocks differ per rank: agree (max) so every rank saves at the same step.
            due = self._any(time.monotonic() - self._last_save_time >= self.ckpt.every_seconds)
        if due:
            self.save(step)
        return due

    def save(self, step: int) -> None:
        """Write a checkpoint of the registered state at ``step`` now (collective: call on every rank)."""
        if self._nonce is None:
            self._setup()
        if step == self.last_saved_step:
            return  # e.g. a final save right after a scheduled one: the state is the same
        t0 = time.monotonic()
        faults.point("save.begin", step=step, rank=self.rank)
        trees: dict[str, Any] = {_rank_key(self.rank): {"rng": rng.capture()}}
        if self.rank == 0:
            trees[REPLICATED] = {}
        for key, (obj, per_rank) in self._objects.items():
            if per_rank:
                trees[_rank_key(self.rank)][key] = obj.state_dict()
            elif self.rank == 0:  # replicated state is identical everywhere: rank 0 writes it
                trees[REPLICATED][key] = obj.state_dict()
        assert self._nonce is not None
        tmp = self.store.root / layout.tmp_dirname(step, self._nonce)
        try:
            tmp.mkdir(exist_ok=True)
            write_shard(tmp, rank=self.rank, step=step, nonce=self._nonce, trees=trees)
            if self.rank == 0:
                meta = {"replicated": sorted(k for k, (_, p) in self._objects.items() if not p),
                        "per_rank": sorted(k for k, (_, p) in self._objects.items() if p)}
                manifest = self.store.commit(tmp, step=step, world_size=self.world_size, nonce=self._nonce,
                                             timeout=self.ckpt.commit_timeout_seconds, meta=meta)
                pruned = self.store.prune(self.ckpt.keep_last, protect={step})
                log.info("saved step %d (%.1f MB, %d file(s)) in %.3fs%s", step, manifest.total_bytes / 1e6,
                         len(manifest.files), time.monotonic() - t0,
                         f"; pruned {', '.join(map(str, pruned))}" if pruned else "")
        except (OSError, CheckpointError) as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written save behind
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"saving step {step} failed writing {e.filename or tmp}: {e.strerror or e} (disk full, quota, "
                f"file size limit or permissions?); the previous checkpoint in {self.store.root} is untouched"
            ) from e
        faults.point("save.end", step=step, rank=self.rank)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()


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

