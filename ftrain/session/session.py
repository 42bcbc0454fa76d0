"""The training-script API: register state, restore, and save on a schedule (a façade over the session package).

A script becomes fault tolerant with a few lines::

    session = ftrain.Session()                      # config from YAML / env / overrides
    session.register(model=model, optimizer=opt, scheduler=sched, loader=loader)
    start = session.restore()                       # newest valid checkpoint, or 0
    for step in range(start, total_steps):
        train_one_step()
        session.step(step + 1)                      # saves when the schedule says so
    session.close()

``step`` counts *completed* optimizer steps: a checkpoint at step N holds the
state after N steps, and ``restore()`` returning N means "run step N+1 next".
Metrics reported with ``report()`` before ``step(n)``/``save(n)`` belong to step n.

Process model: one live Session per process (``close()`` undoes its process
hooks, after which another may be created). All ranks of a job must call
``restore``, ``step`` and ``save`` at the same points (they use collectives).
Not thread-safe. The parts: see ``ftrain/session/__init__.py``.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch.distributed as dist

from ftrain import envvars, exitcodes, faults
from ftrain.attempt import EXITING, RESTORING, SAVING, STARTING, STEPPING
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.config import FtrainConfig, config_to_dict, load_config
from ftrain.data.batching import BatchPlan, plan_batches
from ftrain.errors import FtrainError, NoValidCheckpoint, PeerFailed, StateMismatch
from ftrain.session import decision, rng, teardown
from ftrain.session.checkpointer import Checkpointer
from ftrain.session.collectives import Collectives
from ftrain.session.decision import StepAction, StepInputs
from ftrain.session.liveness import Liveness, Preempted, reports_mistakes, setup_logging
from ftrain.session.reading import Targets
from ftrain.session.record import WorkerEvents
from ftrain.session.registry import Registry, resize_mode
from ftrain.session.restorer import Restored
from ftrain.session.selection import ModelSelection
from ftrain.stateful import Stateful

log = logging.getLogger("ftrain")


#: Seconds a rank waits for its own in-flight write to end once the ranks agreed a save failed (see
#: ``Session._raise_failed_save``): bounded, so that a write stuck on a dead filesystem cannot hold the exit.
_OWN_WRITE_WAIT = 5.0

class Session:
    """Owns the checkpoint schedule and the save/restore protocol for one training process."""

    @reports_mistakes
    def __init__(self, config: FtrainConfig | None = None, *, config_path: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None, total_steps: int | None = None) -> None:
        """``total_steps``: how many steps the script will run, if known (``ftrain status`` shows an ETA)."""
        self.config = config if config is not None else load_config(config_path, overrides=overrides)
        self._ckpt = self.config.checkpoint
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank = int(os.environ.get(envvars.RANK, "0"))
            self.world_size = int(os.environ.get(envvars.WORLD_SIZE, "1"))
        setup_logging(self.rank)
        sup = self.config.supervisor
        self._liveness = Liveness(self.rank, list(sup.preemption_signals), sup.grace_seconds)
        self._liveness.beat(STARTING, 0)
        #: The run's event log (docs/FORMAT.md, "Event log"): never blocks (ftrain/events.py).
        self._events = WorkerEvents(self._ckpt.dir, self.rank)
        self._events.start(self.world_size, total_steps)
        self._liveness.before_exit = self._events.flush
        self._coll = Collectives(self.rank, self.world_size)
        self._checkpointer = Checkpointer(self._ckpt, self._coll, self._events)
        self._store = self._checkpointer.store
        self._registry = Registry()
        self._selection = ModelSelection(self.config)
        #: Step of the checkpoint load_best() loaded, if any.
        self.best_step: int | None = None
        self.last_saved_step: int | None = None
        self.skipped_saves = 0
        self._last_save_time = time.monotonic()
        self._config_meta = config_to_dict(self.config)  # recorded in every manifest; the config is frozen
        teardown.install()  # first: atexit runs it after the flush below (why: teardown.py)
        atexit.register(self._flush_at_exit)

    @reports_mistakes
    def register(self, name: str | None = None, obj: Stateful | None = None, *, per_rank: bool | None = None,
                 **named: Stateful) -> None:
        """Register stateful objects, by keyword (``model=m``) or as ``register("model", m)``.

        Objects are *replicated* (identical on every rank, e.g. a DDP model and
        its optimizer: written once) unless ``per_rank=True`` or they are an
        ftrain loader/sampler, whose position differs per rank.
        """
        objects: dict[str, object] = {name: obj, **named} if name is not None else dict(named)
        for key, o in objects.items():
            self._registry.add(key, o, per_rank)

    # ----------------------------------------------------------------- restore
    @reports_mistakes
    def restore(self) -> int:
        """Load the newest valid checkpoint into the registered objects; return its step, or 0 if none.

        Every rank reads and verifies its own files; if any rank finds damage,
        all fall back to the next older checkpoint together. State is loaded only
        once all ranks hold a verified checkpoint. ``checkpoint.resume: required``
        makes "none valid" an error; ``never`` refuses a directory that has checkpoints.
        """
        t0, started = time.monotonic(), time.time()
        self._liveness.beat(RESTORING, 0)
        self._checkpointer.setup()
        found = (self._checkpointer.restore(self._check, targets=self._targets) if self._ckpt.resume != "never"
                 else None)
        step = 0
        if found is None:
            if self._ckpt.resume == "required":
                raise NoValidCheckpoint(f"checkpoint.resume is 'required' but no valid checkpoint is in "
                                        f"{self._store.root}; run `ftrain ckpt ls {self._store.root}` to see why")
            log.info("no valid checkpoint in %s: starting fresh at step 0", self._store.root)
            self._registry.establish(None, trainable_only=self._ckpt.trainable_only)
        else:
            manifest = found.manifest
            self._load(found, include_rng=True)
            self._registry.establish(manifest, trainable_only=self._ckpt.trainable_only)
            # Rank 0 looks (every rank must drop the same best steps, whatever its view of a shared filesystem).
            self._selection.restore(manifest, lambda steps: [bool(v) for v in self._coll.broadcast(
                [int(self._store.has(s)) for s in steps])])
            step = self.last_saved_step = manifest.step
            faults.point("restore.end", step=step, rank=self.rank)
            log.info("restored step %d from %s in %.3fs", step, self._store.path(step), time.monotonic() - t0)
        self._events.restore(step, started, time.monotonic() - t0, found is not None)
        self._last_save_time = time.monotonic()
        self._liveness.beat(STEPPING, step)
        return step

    def _check(self, manifest: Manifest, trees: dict[str, Any] | None) -> None:
        self._registry.check(manifest, trees, self.rank, self.world_size, self._ckpt.trainable_only,
                            on_resize=resize_mode(self._ckpt.on_resize))

    @reports_mistakes
    def batch_plan(self, global_batch: int, *, max_micro_batch: int | None = None) -> BatchPlan:
        """How this rank takes its share of a constant ``global_batch`` at this run's world size.

        ``plan.micro_batch`` samples per forward pass (at most ``max_micro_batch``),
        ``plan.accumulation`` forward/backward passes per optimizer step. Build the
        loader with ``ResumableLoader(dataset, **plan.loader_args(), ...)``. A
        global batch that does not split over the ranks raises UsageError, or
        under ``data.on_uneven_batch: nearest`` warns and uses the nearest
        smaller one that does (docs/multi-node.md).
        """
        return plan_batches(global_batch, self.world_size, max_micro_batch, self.config.data.on_uneven_batch)

    def _targets(self) -> Targets:
        return self._registry.targets(REPLICATED)

    def _load(self, found: Restored, *, include_rng: bool) -> None:
        # Everything was checked on every rank before this point (Checkpointer.restore). Loading is in two
        # phases the ranks agree on, so that a rank that failed does not leave the others holding new state:
        # what can be undone cheaply first (undone on every rank if any failed), then modules and RNG.
        manifest, trees = found.manifest, found.trees
        resized = manifest.world_size != self.world_size
        replicated = trees[REPLICATED]
        err: BaseException | None = None
        undo: Callable[[], None] | None = None
        try:
            # After a resize each per-rank object's hook maps every saving rank's state onto this rank; the
            # hooks see the same trees on every rank, and a failing one fails the load like a failing load.
            mine = (self._registry.resized(manifest, trees, self.world_size, self.rank) if resized
                    else trees[rank_key(self.rank)])
            undo = self._registry.load_cheap(manifest, replicated, mine,
                                            collect_base=include_rng and self._ckpt.trainable_only)
        except Exception as e:  # any error from an object's load_state_dict: nothing of this phase stays loaded
            err = e
        if self._coll.any(err is not None)[0]:
            if undo is not None:
                undo()
            found.abandon()
            raise StateMismatch(f"restoring checkpoint step {manifest.step} failed "
                                f"({_describe(err) if err else 'on another rank; see its log'}); the registered "
                                "objects were left as they were") from err
        found.finish()  # the registered modules' tensors, read in place (verified on every rank before)
        self._registry.load_rest(manifest, replicated, mine, include_rng=include_rng and not resized)
        if include_rng and resized:
            # Per-rank streams cannot be mapped onto other ranks: derived from (seed, step, rank) instead.
            rng.reseed(rng.resize_seed(trees[rank_key(0)]["rng"], manifest.step, self.rank))
            log.warning("resumed checkpoint step %d, written by %d rank(s), at %d rank(s): replicated state and the "
                        "data position carry over; RNG streams are derived anew per rank (docs/multi-node.md)",
                        manifest.step, manifest.world_size, self.world_size)

    @reports_mistakes
    def load_best(self) -> int | None:
        """Load the best checkpoint by ``checkpoint.selection.monitor`` into the registered objects; return its step.

        Every registered object is loaded (RNG streams are not: they keep going).
        Damaged candidates are skipped like on restore. Returns None, with a
        warning, if no checkpoint records the monitored metric. Collective.
        """
        if self._previous_save_failed():  # the best one may be the save still in flight
            self._raise_failed_save()
        ranked = self._selection.ranked(self._store) if self.rank == 0 else []  # only rank 0 proposes
        found = self._checkpointer.restore(self._check, candidates=iter(ranked), targets=self._targets)
        if found is None:
            log.warning("load_best: no valid checkpoint records %r; the registered objects keep their current state",
                        self._ckpt.selection.monitor)
            return None
        manifest = found.manifest
        self._load(found, include_rng=False)
        self.best_step = manifest.step
        log.info("loaded the best checkpoint: step %d (%s=%s)", manifest.step, self._ckpt.selection.monitor,
                 (manifest.meta.get("metrics") or {}).get(self._ckpt.selection.monitor))
        return manifest.step

    @property
    def should_stop(self) -> bool:
        """True once early stopping fired (``early_stopping.patience``); stays true after a restore."""
        return self._selection.should_stop

    @reports_mistakes
    def report(self, **metrics: Any) -> None:
        """Report metrics (numbers or one-element tensors) for the step about to be passed to :meth:`step`.

        Rank 0's values are what counts: they are recorded in the manifest of a
        checkpoint taken at that step, and ``checkpoint.selection.monitor`` is agreed on by
        all ranks in ``step()`` (ranks that do not evaluate need not report).
        """
        self._selection.report(metrics)

    # -------------------------------------------------------------------- save
    @reports_mistakes
    def step(self, step: int) -> bool:
        """Call once per completed step on every rank; saves when ``every_steps``/``every_seconds`` fall due.

        Also where the rest of the job's fault handling happens, at a point every
        rank reaches together (rules: ``decision.py``): a background save that
        failed on any rank raises :class:`CheckpointError` on every rank; a
        preemption signal on any rank makes every rank save at this step and raise
        :class:`Preempted` (exit 75). Returns whether a save was started.
        """
        if self._checkpointer.nonce is None:
            log.warning("Session.step() called before restore(): starting without resuming")
            self._checkpointer.setup()
        self._liveness.beat(STEPPING, step)
        self._events.step(step)
        faults.point("step", step=step, rank=self.rank)
        time_due = decision.time_due(time.monotonic(), self._last_save_time, self._ckpt.every_seconds)
        # One small collective per step makes every rank take the same decisions: clocks, signal delivery,
        # background writers and reported metrics differ per rank, and a rank that acted alone would deadlock
        # the others. It also carries rank 0's value of the monitored metric.
        (time_due, preempt, failed, busy), values = self._coll.agree(
            (time_due, self._liveness.preempt_requested, self._checkpointer.has_error(), self._checkpointer.busy()),
            self._selection.local_values())
        # Metrics first: any checkpoint of this step, the preemption one included, must hold their effect.
        best_due, stop_now = self._selection.take(step, values[0] if values else None)
        action = decision.decide(StepInputs(step, self._ckpt.every_steps, time_due, preempt, failed, busy, best_due,
                                            stop_now, self._ckpt.selection.save_best_only, self._ckpt.when_busy))
        if action is StepAction.SAVE_AND_EXIT:
            self._save_and_exit(step)
        if action is StepAction.RAISE_FAILED:
            self._raise_failed_save()
        if action is StepAction.SKIP_BUSY:
            self.skipped_saves += 1
            log.warning("skipped the save of step %d: the previous one is still being written "
                        "(checkpoint.when_busy=skip; %d skipped so far)", step, self.skipped_saves)
        if action is not StepAction.SAVE:
            return False
        self._save(step)
        return True

    @reports_mistakes
    def save(self, step: int, *, blocking: bool = False) -> None:
        """Checkpoint the registered state at ``step`` (every rank must call it for the same step).

        With ``checkpoint.async_save`` (the default) this returns once the state
        is copied to host buffers; ``close()`` or ``blocking=True`` waits for the
        commit. A save already in flight is waited for first. Metrics reported
        since the last ``step()`` count for this step (they may re-save it).
        """
        if self._checkpointer.nonce is None:
            self._checkpointer.setup()
        # Agreed, not local: often only rank 0 evaluates, and a rank that decided alone to save the step again
        # would wait in a collective the others skip.
        (reported,), values = self._coll.agree((self._selection.has_pending,), self._selection.local_values())
        value = values[0] if values else None
        if reported or value is not None:
            self._selection.take(step, value)
            if step == self.last_saved_step:
                self.last_saved_step = None  # the metrics (and early stopping) changed: save this step again
        self._save(step, blocking=blocking)

    def _save(self, step: int, *, blocking: bool = False) -> None:
        if step == self.last_saved_step:
            return  # e.g. a final save right after a scheduled one: the state is the same
        t0, started = time.monotonic(), time.time()
        self._liveness.beat(SAVING, step)
        if self._previous_save_failed():
            self._raise_failed_save()
        replicated, mine, meta, buffers = self._registry.capture(self._ckpt.trainable_only)
        meta.update(self._selection.meta_for(step), config=self._config_meta)
        self._checkpointer.save(step, replicated, mine, meta, blocking=blocking, best=self._selection.best_steps,
                               pinned=buffers)
        if blocking or not self._ckpt.async_save:
            faults.point("save.end", step=step, rank=self.rank)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        # The training thread's whole wait, the previous save's included: that is what the save cost it.
        self._events.save(step, started, self._last_save_time - t0)
        self._liveness.beat(STEPPING, step)

    @reports_mistakes
    def close(self) -> None:
        """Wait for the in-flight save to commit; raise if it failed; undo this session's process hooks.

        With ``checkpoint.selection.load_best_at_end`` the registered objects then hold the
        best checkpoint's state (collective).
        """
        try:
            self._selection.warn_at_close()
            if self._ckpt.selection.load_best_at_end:
                self.load_best()
                return
            self._checkpointer.wait()
            self._checkpointer.raise_pending()
        finally:
            atexit.unregister(self._flush_at_exit)
            self._checkpointer.close()  # after the last commit: give the root's lease back
            self._events.finished()
            self._events.close()
            self._liveness.close()

    def __enter__(self) -> Session:
        """``with ftrain.Session(...) as session:``: the end of the block closes the session (:meth:`__exit__`)."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the session at the end of a ``with`` block; the block's exception always propagates unchanged.

        * The block ended normally (or by ``sys.exit(0)``): :meth:`close`. It waits for the save in flight to
          commit, raises if it failed, and loads the best checkpoint under
          ``checkpoint.selection.load_best_at_end``. If the block called ``close()`` itself, nothing more is done.
        * :class:`Preempted`: ``step()`` already committed the final checkpoint (blocking), so the session ends
          without a collective and without loading anything, and waits for uploads no longer than what is left
          of ``supervisor.grace_seconds``. ``Preempted`` propagates, and the process exits with 75.
        * Any other exception: nothing new is saved or loaded, and no collective is entered: the other ranks may
          be gone, or waiting elsewhere. A save already in flight holds state from an earlier step, so it gets
          up to ``supervisor.grace_seconds`` to commit; if it fails, the failure is logged, not raised. Then the
          lease is released and the event log flushed. Unless the exception is a ``SystemExit``, the signal
          handlers and the exception hook stay installed: if the exception goes uncaught, the worker writes its
          error file for the supervisor exactly as it would without ``with`` (a later ``close()`` removes them).
        """
        # Liveness is closed last by close() (in its finally), so it tells whether close() already ran.
        if self._liveness.closed:
            return
        if exc is None or (type(exc) is SystemExit and exc.code in (None, 0)):
            self.close()
            return
        wait = self._liveness.grace_left() if isinstance(exc, Preempted) else self.config.supervisor.grace_seconds
        atexit.unregister(self._flush_at_exit)
        try:
            self._checkpointer.flush(wait)  # logs a failed or unfinished write; the previous checkpoint stays valid
            self._checkpointer.close(wait)  # after the wait: gives the root's lease back
        except Exception:  # must not replace the block's exception
            log.exception("closing the session after %s failed", type(exc).__name__)
        finally:
            self._events.close()  # flushes: no "finished" event, since the run did not finish
            if isinstance(exc, SystemExit):  # no exception hook runs for an exit: nothing is left to report
                self._liveness.close()

    def _raise_failed_save(self) -> None:
        """Every rank raises once the ranks agreed a background save failed: its own error, or a pointer.

        Its own write first gets a moment to end: rank 0's commit learns of another rank's failed shard through
        the job's store, and may still be reading it when the step's collective already said "failed"; then it
        names the failing rank and step instead of pointing at another rank's log."""
        self._checkpointer.wait(_OWN_WRITE_WAIT)
        self._checkpointer.raise_pending()
        raise PeerFailed("another rank's background checkpoint write failed; see its log")

    def _previous_save_failed(self) -> bool:
        """Wait for the in-flight save; True on every rank if it failed on any (collective)."""
        self._checkpointer.wait()
        return self._coll.any(self._checkpointer.has_error())[0]

    def _save_and_exit(self, step: int) -> None:
        self._liveness.beat(SAVING, step)
        if self._previous_save_failed():
            # The preemption checkpoint does not depend on the failed one: log it and save anyway.
            err = self._checkpointer.take_error()
            log.error("the previous background save failed (%s); taking the preemption checkpoint anyway",
                      err or "on another rank")
            self._selection.save_failed(self.last_saved_step)
            self.last_saved_step = None
        self._save(step, blocking=True)
        # With a remote tier the machine may not come back: the final checkpoint is uploaded before we exit,
        # within what is left of the grace period (rank 0 uploads; a failed or late upload is logged).
        remote = self._checkpointer.wait_remote(step, max(0.0, self._liveness.grace_left() - 2.0))
        self._liveness.write_preempted_marker(step, remote)
        uploaded = None if not self._ckpt.remote.url else remote is not None
        self._events.preempted(step, self._liveness.preempt_reason, uploaded)
        self._events.flush(1.0)  # the process exits next
        log.warning("preempted (%s): checkpoint of step %d committed%s; exiting with code %d",
                    self._liveness.preempt_reason or "another rank was signalled", step,
                    "" if not self._ckpt.remote.url or self.rank != 0 else " and uploaded" if remote is not None else
                    " locally, NOT uploaded to the remote tier in time", exitcodes.PREEMPTED)
        self._liveness.beat(EXITING, step)
        raise Preempted(step)

    def _flush_at_exit(self) -> None:
        # A script that ends without close() must not lose its last (background) save, nor exit 0 when it
        # failed. But a process exiting on an uncaught exception (its peers may be dead) must not wait for a
        # commit that may never happen: then the wait is bounded by the grace period.
        crashing = self._liveness.crashing
        flushed = self._checkpointer.flush(self.config.supervisor.grace_seconds if crashing else None)
        # After the last commit: give the root's lease back (and, crashing, wait for uploads no longer than the
        # grace period: the process's peers may be gone, its supervisor waiting to restart).
        self._checkpointer.close(self.config.supervisor.grace_seconds if crashing else None)
        self._events.flush(1.0)
        if not flushed and not crashing:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exitcodes.FAILURE)


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, FtrainError) else f"{type(err).__name__}: {err}"
