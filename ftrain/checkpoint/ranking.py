"""Model selection's pure part: the monitored metric, keep-best ranking and early stopping.

Storage leaf: the session (worker side) ranks its checkpoints with it, and the ``ftrain ckpt`` tools and
fine-tuning rank checkpoints from their manifests (no torch). Pure logic, no I/O and no collectives, so it is
unit-tested directly. The session feeds it rank 0's value of the monitored metric (the same on every rank,
broadcast in the per-step collective), so every rank takes the same decisions.

Its state is written into every checkpoint's manifest (``meta.selection``) and
restored with it: an early-stopping counter that reset on every restart would
never stop a run that is preempted often, and a restarted run must know which
checkpoints are its best ones so that retention keeps them.

Semantics (the Keras/HF conventions users know):

* ``mode`` ``min`` or ``max``; ``auto`` picks ``max`` for names that look like a
  score (``acc``, ``f1``, ``auc``, ...) and ``min`` otherwise (losses, errors).
* Keep-best: a checkpoint is one of the best ``keep_best`` when its value beats
  the worst of the current top-K strictly (an equal value does not displace an
  older checkpoint). NaN never ranks.
* Early stopping: an evaluation improves when it beats the best so far by more
  than ``min_delta``; after ``patience`` evaluations in a row without
  improvement, :attr:`Selection.should_stop` becomes true (and stays true).

Not thread-safe; one instance per session.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftrain.errors import CheckpointError, StateMismatch

if TYPE_CHECKING:
    from ftrain.checkpoint.manifest import Manifest

log = logging.getLogger("ftrain")

MODES = ("auto", "min", "max")
#: Name tokens that mean "lower is better" for mode auto; they win over the others (``dice_loss``, ``top1_err``).
_MIN_TOKENS = frozenset({"loss", "err", "error", "errors", "wer", "cer", "ppl", "perplexity", "mse", "mae", "rmse",
                         "nll", "distance", "dist"})
#: Token endings with the same meaning, for names written without separators (``valloss``, ``top1err``).
_MIN_SUFFIXES = ("loss", "err", "error")
#: Name tokens that mean "higher is better" for mode auto.
_MAX_TOKENS = frozenset({"acc", "accuracy", "f1", "fmeasure", "auc", "auroc", "precision", "recall", "iou", "miou",
                         "bleu", "map", "ap", "top1", "top5", "r2", "psnr", "ssim", "dice", "score"})
_MAX_PREFIXES = ("acc", "rouge", "f1")


def resolve_mode(monitor: str, mode: str) -> str:
    """``min`` or ``max`` for ``monitor``; ``auto`` guesses from the name (``val_acc`` -> max, else min)."""
    if mode in ("min", "max"):
        return mode
    tokens = [t for t in re.split(r"[^a-z0-9]+", monitor.lower()) if t]
    if any(t in _MIN_TOKENS or t.endswith(_MIN_SUFFIXES) for t in tokens):
        return "min"
    if any(t in _MAX_TOKENS or t.startswith(_MAX_PREFIXES) for t in tokens):
        return "max"
    return "min"


def improves(value: float, reference: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``reference`` by more than ``min_delta`` (None: nothing to beat yet)."""
    if math.isnan(value):
        return False
    if reference is None:
        return True
    return value < reference - min_delta if mode == "min" else value > reference + min_delta


def rank_steps(values: Iterable[tuple[int, float]], mode: str) -> list[int]:
    """Steps ordered best first by their value; ties go to the older step; NaN is left out."""
    finite = [(v, s) for s, v in values if not math.isnan(v)]
    return [s for v, s in sorted(finite, key=lambda vs: ((vs[0] if mode == "min" else -vs[0]), vs[1]))]


@dataclass(frozen=True)
class SelectionSpec:
    """What to monitor and how: from ``checkpoint.selection.*``, ``.retention.keep_best`` and ``early_stopping.*``."""

    monitor: str = ""
    mode: str = "min"  # resolved: min or max
    keep_best: int = 0
    patience: int = 0
    min_delta: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.monitor)


class Selection:
    """Top-K saved checkpoints by the monitored metric, and the early-stopping counter. ``Stateful``."""

    VERSION = 1

    def __init__(self, spec: SelectionSpec) -> None:
        self.spec = spec
        #: ``[(value, step)]`` of saved checkpoints, best first, at most ``keep_best`` long.
        self.best: list[tuple[float, int]] = []
        self.es_best: float | None = None
        self.es_best_step: int | None = None
        self.evals_without_improvement = 0
        self.stopped_step: int | None = None
        self.last: tuple[int, float] | None = None  # (step, value) of the last evaluation seen

    # ------------------------------------------------------------------ decisions
    def observe(self, step: int, value: float) -> bool:
        """Account one evaluation of the monitored metric at ``step``; True if early stopping fires now."""
        if self.last is not None and self.last[0] == step:
            return False  # the same evaluation seen twice (e.g. replayed): count it once
        self.last = (step, value)
        if self.stopped_step is not None:
            return False
        spec = self.spec
        if improves(value, self.es_best, spec.mode, spec.min_delta):
            self.es_best, self.es_best_step = value, step
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        if spec.patience > 0 and self.evals_without_improvement >= spec.patience:
            self.stopped_step = step
            return True
        return False

    def ranks_best(self, value: float) -> bool:
        """Whether a checkpoint with ``value`` would be one of the best ``keep_best``."""
        if self.spec.keep_best <= 0 or math.isnan(value):
            return False
        if len(self.best) < self.spec.keep_best:
            return True
        return improves(value, self.best[-1][0], self.spec.mode)

    def record_saved(self, step: int, value: float) -> None:
        """A checkpoint of ``step`` with ``value`` is being saved: rank it among the best."""
        entries = [(v, s) for v, s in self.best if s != step] + [(value, step)]
        order = rank_steps(((s, v) for v, s in entries), self.spec.mode)[: max(0, self.spec.keep_best)]
        by_step = {s: v for v, s in entries}
        self.best = [(by_step[s], s) for s in order]

    def discard(self, step: int) -> None:
        """Forget checkpoint ``step`` (its save failed, or it is gone): it no longer holds a keep-best slot."""
        self.best = [(v, s) for v, s in self.best if s != step]

    @property
    def best_steps(self) -> list[int]:
        return [s for _, s in self.best]

    @property
    def should_stop(self) -> bool:
        return self.stopped_step is not None

    def describe_stop(self) -> str:
        spec = self.spec
        return (f"early stopping at step {self.stopped_step}: {spec.monitor} has not improved by more than "
                f"{spec.min_delta:g} for {self.evals_without_improvement} evaluation(s) (patience {spec.patience}); "
                f"best {self.es_best!r} at step {self.es_best_step}")

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "monitor": self.spec.monitor,
            "mode": self.spec.mode,
            "best": [[_json_float(v), s] for v, s in self.best],
            "early_stopping": {
                "best": None if self.es_best is None else _json_float(self.es_best),
                "best_step": self.es_best_step,
                "evals_without_improvement": self.evals_without_improvement,
                "stopped_step": self.stopped_step,
            },
            "last": None if self.last is None else [self.last[0], _json_float(self.last[1])],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state for a different metric or mode is ignored with a warning (the user changed it)."""
        if not isinstance(state, dict) or state.get("version") != self.VERSION:
            raise StateMismatch(f"model selection state: version {_get(state, 'version')!r} is not "
                                f"{self.VERSION}; this ftrain cannot continue its keep-best and early stopping")
        if (state.get("monitor"), state.get("mode")) != (self.spec.monitor, self.spec.mode):
            log.warning("the checkpoint monitored %r (%s), this run monitors %r (%s): keep-best and early stopping "
                        "start afresh", state.get("monitor"), state.get("mode"), self.spec.monitor, self.spec.mode)
            return
        try:
            best = [(_from_json(v), _int(s)) for v, s in state["best"]]
            es = state["early_stopping"]
            es_best = None if es["best"] is None else _from_json(es["best"])
            es_best_step = None if es["best_step"] is None else _int(es["best_step"])
            waited = _int(es["evals_without_improvement"])
            stopped = None if es["stopped_step"] is None else _int(es["stopped_step"])
            last = None if state["last"] is None else (_int(state["last"][0]), _from_json(state["last"][1]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise StateMismatch(f"model selection state is malformed ({type(e).__name__}: {e})") from None
        self.best = best
        if len(self.best) > self.spec.keep_best:  # keep_best was lowered since: the tail is no longer protected
            self.best = self.best[: max(0, self.spec.keep_best)]
        self.es_best, self.es_best_step, self.evals_without_improvement = es_best, es_best_step, waited
        self.stopped_step, self.last = stopped, last
        if self.stopped_step is not None and (self.spec.patience == 0 or waited < self.spec.patience):
            self.stopped_step = None  # early stopping was switched off or given more patience since: train on


def _json_float(v: float) -> float | str:
    """JSON has no inf/NaN: write them as strings (Python's json would emit invalid ``Infinity``)."""
    return v if math.isfinite(v) else repr(v)


def _from_json(v: Any) -> float:
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"not a number: {v!r}")
    return float(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"not an integer: {v!r}")
    return v


def _get(state: Any, key: str) -> Any:
    return state.get(key) if isinstance(state, dict) else None


def metric_value(meta: dict[str, Any], monitor: str) -> float | None:
    """The value of ``monitor`` a manifest's ``meta.metrics`` records for its own step, if any."""
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict) or monitor not in metrics:
        return None
    try:
        return _from_json(metrics[monitor])
    except ValueError:
        return None


def json_metrics(metrics: dict[str, float]) -> dict[str, float | str]:
    return {k: _json_float(v) for k, v in metrics.items()}


def best_ranking(manifests: list[Manifest]) -> tuple[str, str, list[Manifest]]:
    """``(monitor, mode, manifests best first)`` by the metric the newest checkpoint monitors.

    Only checkpoints whose manifest records that metric for their own step are
    ranked. Raises :class:`CheckpointError` if no checkpoint monitors a metric.
    """
    monitor = next((m.meta["monitor"] for m in reversed(manifests) if _valid_monitor(m.meta.get("monitor"))), None)
    if monitor is None:
        raise CheckpointError("no checkpoint records a monitored metric, so none is 'best'; "
                              "set checkpoint.selection.monitor and report it with session.report()")
    name, mode = monitor["name"], monitor["mode"]
    values = {m.step: metric_value(m.meta, name) for m in manifests}
    order = rank_steps(((s, v) for s, v in values.items() if v is not None), mode)
    by_step = {m.step: m for m in manifests}
    return name, mode, [by_step[s] for s in order]


def rank_manifests(manifests: list[Manifest]) -> list[Manifest]:
    """The manifests best first (see :func:`best_ranking`); the ranking the checkpoint reader is given."""
    return best_ranking(manifests)[2]


def _valid_monitor(monitor: Any) -> bool:
    return isinstance(monitor, dict) and isinstance(monitor.get("name"), str) and monitor.get("mode") in ("min", "max")
