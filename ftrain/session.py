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

import atexit
import logging
import os
import sys
import time
from typing import Any

import torch.distributed as dist

from ftrain import envvars, exitcodes, faults, rng
from ftrain.attempt import EXITING, RESTORING, SAVING, STARTING, STEPPING
from ftrain.checkpoint.checkpointer import REPLICATED, Checkpointer, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.collectives import Collectives
from ftrain.config import FtrainConfig, load_config
from ftrain.errors import CheckpointError, FtrainError, NoValidCheckpoint, StateMismatch
from ftrain.stateful import Stateful
from ftrain.worker import Preempted, Worker

log = logging.getLogger("ftrain")

_RESERVED = frozenset({"rng"})


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
        self.coll = Collectives(self.rank, self.world_size)
        self.checkpointer = Checkpointer(self.ckpt, self.coll)
        self.store = self.checkpointer.store
        self._objects: dict[str, tuple[Stateful, bool]] = {}
        self.last_saved_step: int | None = None
        self.skipped_saves = 0
        self._last_save_time = time.monotonic()
        self._crashing = False
        self._note_crash()
        atexit.register(self._flush_at_exit)

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

    # ----------------------------------------------------------------- restore
    def restore(self) -> int:
        """Load the newest valid checkpoint into the registered objects; return its step, or 0 if none.

        Every rank reads and verifies its own files; if any rank finds damage,
        all fall back to the next older checkpoint together. State is loaded only
        once all ranks hold a verified checkpoint. ``checkpoint.resume: required``
        makes "none valid" an error; ``never`` refuses a directory that has checkpoints.
        """
        t0 = time.monotonic()
        self.worker.beat(RESTORING, 0)
        self.checkpointer.setup()
        found = self.checkpointer.restore(self._check_layout) if self.ckpt.resume != "never" else None
        if found is None:
            if self.ckpt.resume == "required":
                raise NoValidCheckpoint(f"checkpoint.resume is 'required' but no valid checkpoint is in "
                                        f"{self.store.root}; run `ftrain ckpt ls {self.store.root}` to see why")
            log.info("no valid checkpoint in %s: starting fresh at step 0", self.store.root)
            step = 0
        else:
            manifest, trees = found
            replicated, mine = trees[REPLICATED], trees[rank_key(self.rank)]
            for key, (obj, per_rank) in self._objects.items():
                obj.load_state_dict((mine if per_rank else replicated)[key])
            rng.restore(mine["rng"])  # last: loading other state must not disturb the restored streams
            step = manifest.step
            faults.point("restore.end", step=step, rank=self.rank)
            self.last_saved_step = step
            log.info("restored step %d from %s in %.3fs", step, self.store.path(step), time.monotonic() - t0)
        self._last_save_time = time.monotonic()
        self.worker.beat(STEPPING, step)
        return step

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

    # -------------------------------------------------------------------- save
    def step(self, step: int) -> bool:
        """Call once per completed step on every rank; saves when ``every_steps``/``every_seconds`` fall due.

        Also where the rest of the job's fault handling happens, at a point every
        rank reaches together: a background save that failed on any rank raises
        :class:`CheckpointError` on every rank; a preemption signal on any rank
        makes every rank save at this step and raise :class:`Preempted` (exit 75).
        Returns whether a save was started.
        """
        if self.checkpointer.nonce is None:
            log.warning("Session.step() called before restore(): starting without resuming")
            self.checkpointer.setup()
        self.worker.beat(STEPPING, step)
        faults.point("step", step=step, rank=self.rank)
        due = self.ckpt.every_steps > 0 and step % self.ckpt.every_steps == 0
        time_due = self.ckpt.every_seconds > 0 and time.monotonic() - self._last_save_time >= self.ckpt.every_seconds
        # One small collective per step makes every rank take the same decisions: clocks, signal delivery
        # and background writers differ per rank, and a rank that acted alone would deadlock the others.
        time_due, preempt, failed, busy = self.coll.any(
            time_due, self.worker.preempt_requested, self.checkpointer.has_error(), self.checkpointer.busy())
        if preempt:  # first: the preemption checkpoint does not depend on an earlier failed one
            self._save_and_exit(step)
        if failed:
            self._raise_failed_save()
        if not (due or time_due):
            return False
        if busy and self.ckpt.when_busy == "skip":
            self.skipped_saves += 1
            log.warning("skipped the save of step %d: the previous one is still being written "
                        "(checkpoint.when_busy=skip; %d skipped so far)", step, self.skipped_saves)
            return False
        self.save(step)
        return True

    def save(self, step: int, *, blocking: bool = False) -> None:
        """Checkpoint the registered state at ``step`` (every rank must call it for the same step).

        With ``checkpoint.async_save`` (the default) this returns once the state
        is copied to host buffers; ``close()`` or ``blocking=True`` waits for the
        commit. A save already in flight is waited for first.
        """
        if self.checkpointer.nonce is None:
            self.checkpointer.setup()
        if step == self.last_saved_step:
            return  # e.g. a final save right after a scheduled one: the state is the same
        self.worker.beat(SAVING, step)
        if self._previous_save_failed():
            self._raise_failed_save()
        replicated = {k: o.state_dict() for k, (o, per_rank) in self._objects.items() if not per_rank}
        mine: dict[str, Any] = {"rng": rng.capture()}
        mine.update((k, o.state_dict()) for k, (o, per_rank) in self._objects.items() if per_rank)
        meta = {"replicated": sorted(replicated), "per_rank": sorted(set(mine) - {"rng"})}
        self.checkpointer.save(step, replicated, mine, meta, blocking=blocking)
        if blocking or not self.ckpt.async_save:
            faults.point("save.end", step=step, rank=self.rank)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        self.worker.beat(STEPPING, step)

    def close(self) -> None:
        """Wait for the in-flight save to commit; raise if it failed. Call at the end of training."""
        self.checkpointer.wait()
        self.checkpointer.raise_pending()

    def _raise_failed_save(self) -> None:
        """Every rank raises once the ranks agreed a background save failed: its own error, or a pointer."""
        self.checkpointer.raise_pending()
        raise CheckpointError("another rank's background checkpoint write failed; see its log")

    def _previous_save_failed(self) -> bool:
        """Wait for the in-flight save; True on every rank if it failed on any (collective)."""
        self.checkpointer.wait()
        return self.coll.any(self.checkpointer.has_error())[0]

    def _save_and_exit(self, step: int) -> None:
        self.worker.beat(SAVING, step)
        if self._previous_save_failed():
            # The preemption checkpoint does not depend on the failed one: log it and save anyway.
            err = self.checkpointer.take_error()
            log.error("the previous background save failed (%s); taking the preemption checkpoint anyway",
                      err or "on another rank")
            self.last_saved_step = None
        self.save(step, blocking=True)
        self.worker.write_preempted_marker(step)
        log.warning("preempted (%s): checkpoint of step %d committed; exiting with code %d",
                    self.worker.preempt_reason or "another rank was signalled", step, exitcodes.PREEMPTED)
        self.worker.beat(EXITING, step)
        raise Preempted(step)

    def _flush_at_exit(self) -> None:
        # A script that ends without close() must not lose its last (background) save, nor exit 0 when it
        # failed. But a process exiting on an uncaught exception (its peers may be dead) must not wait for a
        # commit that may never happen: then the wait is bounded by the grace period.
        limit = self.config.supervisor.grace_seconds if self._crashing else None
        if not self.checkpointer.wait(timeout=limit):
            log.error("exiting with a checkpoint write still in flight after %.0fs; it will not commit", limit)
            return
        err = self.checkpointer.take_error()
        if err is not None:
            log.error("the last checkpoint did not commit: %s", err)
            if not self._crashing:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exitcodes.FAILURE)

    def _note_crash(self) -> None:
        previous = sys.excepthook

        def hook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
            self._crashing = True
            previous(etype, value, tb)

        sys.excepthook = hook


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

