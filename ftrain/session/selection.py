"""Worker side: model selection as the session runs it: reported metrics, keep-best saves, early stopping.

The ranking itself is pure (``ranking.py``); this object adds what a training
process needs around it: metrics reported since the last step, rank 0's value
of the monitored metric as every rank agreed on it, what a checkpoint records
(``meta.metrics``, ``meta.monitor``, ``meta.selection``, ``meta.best_steps``,
docs/FORMAT.md), undoing the ranking of a save that failed, and the state a
restore brings back.

Not thread-safe: used by the training thread of one session.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.ranking import Selection, SelectionSpec, json_metrics, rank_manifests, resolve_mode
from ftrain.checkpoint.store import CheckpointStore
from ftrain.config import FtrainConfig
from ftrain.errors import CheckpointError, FtrainError

log = logging.getLogger("ftrain")


class ModelSelection:
    def __init__(self, config: FtrainConfig) -> None:
        sel, es = config.checkpoint.selection, config.early_stopping
        self.monitor = sel.monitor
        self.ranking = Selection(SelectionSpec(sel.monitor, resolve_mode(sel.monitor, sel.mode),
                                               config.checkpoint.retention.keep_best,
                                               es.patience, es.min_delta))
        #: Metrics reported since the last step() (this rank's), and those of the last step() that had any.
        self._pending: dict[str, float] = {}
        self._metrics: tuple[int, dict[str, float]] = (-1, {})
        #: Rank 0's value of the monitored metric at a step, as every rank agreed on it in step().
        self._monitored: tuple[int, float] | None = None
        self._warned_unmonitored = False
        #: The keep-best ranking before the last save ranked itself among the best: put back if that save fails.
        self._best_before: tuple[int, list[tuple[float, int]]] | None = None

    @property
    def enabled(self) -> bool:
        return self.ranking.spec.enabled

    @property
    def should_stop(self) -> bool:
        return self.ranking.should_stop

    @property
    def best_steps(self) -> list[int]:
        """The steps retention keeps as best ones, best first."""
        return self.ranking.best_steps

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    # ------------------------------------------------------------------ reports
    def report(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            try:
                self._pending[name] = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise FtrainError(f"session.report({name}=...): expected a number or a one-element tensor, got "
                                  f"{type(value).__name__}") from None

    def local_values(self) -> list[float | None]:
        """This rank's value of the monitored metric for the per-step collective (only rank 0's counts)."""
        return [self._pending.get(self.monitor)] if self.monitor else []

    def take(self, step: int, value: float | None) -> tuple[bool, bool]:
        """Account this step's reports, ``value`` being the agreed monitored value;
        ``(ranks among the best, early stopping fired)``."""
        if self._pending:
            earlier = self._metrics[1] if self._metrics[0] == step else {}
            self._metrics = (step, {**earlier, **self._pending})
            if self.monitor and self.monitor not in self._pending and not self._warned_unmonitored:
                self._warned_unmonitored = True
                log.warning("reported %s but checkpoint.selection.monitor is %r: keep-best and early stopping see "
                            "nothing", sorted(self._pending), self.monitor)
            self._pending = {}
        if value is None:
            return False, False
        self._monitored = (step, value)
        stop_now = self.ranking.observe(step, value)
        if stop_now:
            log.warning("%s", self.ranking.describe_stop())
        return self.ranking.ranks_best(value), stop_now

    # -------------------------------------------------------------------- saves
    def meta_for(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` records about metrics; ranks it among the best if it is one."""
        self._best_before = None  # only this save's own ranking may be undone if it fails
        metrics = self._metrics[1] if self._metrics[0] == step else {}
        meta: dict[str, Any] = {"metrics": json_metrics(metrics)}
        if not self.enabled:
            return meta
        if self._monitored is not None and self._monitored[0] == step and self.ranking.ranks_best(self._monitored[1]):
            self._best_before = (step, list(self.ranking.best))
            self.ranking.record_saved(step, self._monitored[1])
        meta.update(monitor={"name": self.ranking.spec.monitor, "mode": self.ranking.spec.mode},
                    selection=self.ranking.state_dict(), best_steps=self.ranking.best_steps)
        return meta

    def save_failed(self, step: int | None) -> None:
        """The save of ``step`` never committed: it is not a best one, and the best it displaced stays protected."""
        if self._best_before is not None and self._best_before[0] == step:
            self.ranking.best = self._best_before[1]
        self._best_before = None

    # ------------------------------------------------------------------ restore
    def restore(self, manifest: Manifest, present: Callable[[list[int]], list[bool]]) -> None:
        """Take the keep-best and early-stopping state from ``manifest``.

        ``present`` says which best steps still have a checkpoint (the session
        asks rank 0 and broadcasts, so every rank drops the same ones).
        """
        saved = manifest.meta.get("selection")
        if not (self.enabled and saved is not None):
            return
        self.ranking.load_state_dict(saved)
        if self.ranking.should_stop:
            log.info("restored: %s", self.ranking.describe_stop())
        # A best checkpoint whose save failed, or that was deleted by hand, must not hold a keep-best slot.
        steps = self.ranking.best_steps
        if steps:
            for s, ok in zip(steps, present(steps), strict=True):
                if not ok:
                    log.warning("best checkpoint step %d is gone; it no longer counts among the best", s)
                    self.ranking.discard(s)

    def ranked(self, store: CheckpointStore) -> list[Manifest]:
        """The checkpoints in ``store``, best first by their recorded metric (none, with a warning, if unreadable)."""
        try:
            return rank_manifests(store.manifests())
        except (CheckpointError, OSError) as e:  # the caller must still join the restore's collectives
            log.warning("load_best: %s", e)
            return []

    def warn_at_close(self) -> None:
        if self.monitor and self.ranking.last is None:
            log.warning("checkpoint.selection.monitor is %r but it was never reported with session.report(): no "
                        "checkpoint was ranked", self.monitor)
        if self._pending:
            log.warning("metrics %s were reported after the last step()/save() and are in no checkpoint",
                        sorted(self._pending))
