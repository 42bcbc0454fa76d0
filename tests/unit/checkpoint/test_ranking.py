"""Pure logic of model selection: modes, top-K ranking, early stopping, and its saved state."""
from __future__ import annotations

import json
import math

import pytest

from ftrain.errors import StateMismatch
from ftrain.checkpoint.ranking import Selection, SelectionSpec, improves, rank_steps, resolve_mode


@pytest.mark.parametrize("name,mode", [
    ("val_loss", "min"), ("loss", "min"), ("val/error", "min"), ("perplexity", "min"), ("wer", "min"),
    ("val_acc", "max"), ("accuracy", "max"), ("val/f1", "max"), ("eval_auc", "max"), ("rouge_l", "max"),
    ("top1", "max"), ("mAP", "max"), ("val_accuracy_top5", "max"),
    # A loss or error named after a score is still minimised.
    ("dice_loss", "min"), ("iou_loss", "min"), ("top1_err", "min"), ("top5_error", "min"), ("val_ssim_loss", "min"),
    ("toploss", "min"), ("acc_loss", "min"), ("valloss", "min"), ("top1err", "min"),
    # ...but a score whose other words merely contain "er", "mae" or "loss"-like letters is maximised.
    ("answer_acc", "max"), ("val_answer_f1", "max"), ("cancer_auroc", "max"), ("soccer_acc", "max"),
    ("concern_f1", "max"), ("tower_acc", "max"), ("maestro_acc", "max"),
])
def test_auto_mode_guesses_from_the_name(name: str, mode: str) -> None:
    assert resolve_mode(name, "auto") == mode
    assert resolve_mode(name, "min") == "min" and resolve_mode(name, "max") == "max"


def test_improves_respects_mode_delta_and_nan() -> None:
    assert improves(0.5, None, "min") and improves(0.5, 0.6, "min") and not improves(0.6, 0.5, "min")
    assert improves(0.6, 0.5, "max") and not improves(0.5, 0.5, "max")
    assert not improves(0.55, 0.6, "min", min_delta=0.1) and improves(0.49, 0.6, "min", min_delta=0.1)
    assert not improves(math.nan, None, "min") and not improves(math.nan, 1.0, "max")
    assert improves(-math.inf, 0.0, "min") and improves(math.inf, 0.0, "max")


def test_rank_steps_breaks_ties_by_age_and_drops_nan() -> None:
    values = [(10, 0.5), (20, 0.3), (30, 0.5), (40, math.nan), (50, 0.1)]
    assert rank_steps(values, "min") == [50, 20, 10, 30]
    assert rank_steps(values, "max") == [10, 30, 20, 50]


def spec(**kw) -> SelectionSpec:
    base = dict(monitor="val_loss", mode="min", keep_best=2, patience=0, min_delta=0.0)
    base.update(kw)
    return SelectionSpec(**base)


def test_top_k_keeps_the_k_best_saved() -> None:
    sel = Selection(spec(keep_best=2))
    for step, v in [(5, 1.0), (10, 0.5), (15, 0.7), (20, 0.4), (25, 0.9), (30, 0.45)]:
        if sel.ranks_best(v):
            sel.record_saved(step, v)
    assert sel.best_steps == [20, 30]
    assert not sel.ranks_best(0.45)  # an equal value does not displace an older checkpoint
    assert sel.ranks_best(0.44) and not sel.ranks_best(math.nan)
    sel.record_saved(30, 0.2)  # the same step saved again (after a restart) replaces its entry
    assert sel.best == [(0.2, 30), (0.4, 20)]


def test_keep_best_zero_ranks_nothing() -> None:
    sel = Selection(spec(keep_best=0))
    assert not sel.ranks_best(0.1)


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    sel = Selection(spec(patience=3, min_delta=0.05))
    fired = [step for step, v in [(1, 1.0), (2, 0.9), (3, 0.88), (4, 0.86), (5, 0.7), (6, 0.69), (7, 0.7), (8, 0.8),
                                  (9, 0.1)] if sel.observe(step, v)]
    # 0.88 and 0.86 do not beat 0.9 by more than 0.05; 0.7 does; then 0.69, 0.7, 0.8 do not: stop at 8.
    assert fired == [8]
    assert sel.should_stop and sel.stopped_step == 8 and sel.es_best == 0.7 and sel.es_best_step == 5
    assert not sel.observe(9, 0.1) and sel.stopped_step == 8  # stays stopped
    assert "step 8" in sel.describe_stop() and "val_loss" in sel.describe_stop()


def test_early_stopping_off_never_fires_but_tracks() -> None:
    sel = Selection(spec(patience=0))
    assert not any(sel.observe(s, 1.0) for s in range(1, 50))
    assert sel.evals_without_improvement == 48 and not sel.should_stop


def test_nan_counts_as_no_improvement() -> None:
    sel = Selection(spec(patience=2))
    assert not sel.observe(1, math.nan) and sel.observe(2, math.nan)


def test_state_round_trips_through_json_with_infinities() -> None:
    sel = Selection(spec(patience=4))
    for step, v in [(1, math.inf), (2, 0.5), (3, -math.inf), (4, math.nan), (5, 0.7)]:
        sel.observe(step, v)
        if sel.ranks_best(v):
            sel.record_saved(step, v)
    state = json.loads(json.dumps(sel.state_dict(), allow_nan=False))  # strict JSON: no bare NaN/Infinity
    again = Selection(spec(patience=4))
    again.load_state_dict(state)
    assert again.state_dict() == sel.state_dict()
    assert again.best == [(-math.inf, 3), (0.5, 2)]
    assert again.last == (5, 0.7) and again.es_best == -math.inf
    # The restored tracker decides exactly as the original would.
    for step, v in [(6, 0.8), (7, 0.9)]:
        assert again.observe(step, v) == sel.observe(step, v)
    assert again.stopped_step == sel.stopped_step == 7


def test_state_for_another_metric_is_ignored_and_malformed_state_refused(caplog) -> None:
    sel = Selection(spec())
    sel.record_saved(3, 0.1)
    other = Selection(spec(monitor="val_acc", mode="max"))
    other.load_state_dict(sel.state_dict())
    assert other.best == [] and "start afresh" in caplog.text
    with pytest.raises(StateMismatch, match="version"):
        Selection(spec()).load_state_dict({"version": 99})
    for field, value in (("best", [["x", 3]]), ("best", [[0.1, 3.5]]), ("last", [1e400, 0.5]), ("best", [[0.1, True]])):
        bad = sel.state_dict()
        bad[field] = value
        with pytest.raises(StateMismatch, match="malformed"):
            Selection(spec()).load_state_dict(bad)


def test_lowering_keep_best_or_turning_patience_off_applies_on_restore() -> None:
    sel = Selection(spec(keep_best=3, patience=1))
    for step, v in [(1, 0.3), (2, 0.2), (3, 0.1)]:
        sel.record_saved(step, v)
    sel.observe(1, 0.1)
    sel.observe(2, 0.2)
    assert sel.should_stop
    smaller = Selection(spec(keep_best=1, patience=0))
    smaller.load_state_dict(sel.state_dict())
    assert smaller.best_steps == [3] and not smaller.should_stop
    more_patient = Selection(spec(keep_best=3, patience=5))
    more_patient.load_state_dict(sel.state_dict())
    assert not more_patient.should_stop and more_patient.evals_without_improvement == 1
    same = Selection(spec(keep_best=3, patience=1))
    same.load_state_dict(sel.state_dict())
    assert same.should_stop


def test_discard_frees_a_keep_best_slot() -> None:
    sel = Selection(spec(keep_best=2))
    sel.record_saved(1, 0.2)
    sel.record_saved(2, 0.1)
    assert not sel.ranks_best(0.3)
    sel.discard(2)
    assert sel.best_steps == [1] and sel.ranks_best(0.3)
