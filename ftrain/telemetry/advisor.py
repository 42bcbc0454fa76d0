"""Which checkpoint interval a run should use, from its own measurements (pure).

Inputs, all measured from the run's timeline: the save cost ``Ts`` (the training
thread's mean blocking time per save), the recovery time ``Tr`` (mean seconds
from the end of an attempt's work to the next attempt working: detection,
teardown, backoff, startup, rendezvous, restore) and the mean time between
failures that lose work ``M`` (running time over unplanned ends; ``--mtbf``
overrides it). Preemptions with a final save lose no work, so they do not count.

The optima (arXiv 2410.18124, after Young 1974 and Daly 2006), as compute time
between saves, which is what ``checkpoint.every_seconds`` measures (from the end
of one save to the start of the next):

* Young: ``sqrt(2 * M * Ts)``;
* Daly (availability, recovery included): ``Tc - Ts`` with ``Tc = Ts + sqrt(2 * (M + Tr) * Ts + Ts**2)``.

"The goodput it would have had" comes from a model of this run at interval ``τ``:
the productive time ``P`` stays; saves cost ``P * Ts / τ``; failures arrive at
rate ``1 / M`` of wall time and each costs ``Tr`` plus half an interval of lost
work on average; the rest ``X`` (first start, preemptions, the final teardown)
stays as measured. Wall ``W(τ) = (P * (1 + Ts / τ) + X) / (1 - ((τ + Ts) / 2 + Tr) / M)``.
The same model at the interval the run used is printed beside the measured
goodput, so the user can see how far to trust it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ftrain.telemetry.timeline import Timeline


@dataclass(frozen=True)
class Advice:
    save_cost: float
    recovery: float
    mtbf: float
    mtbf_given: bool
    young: float
    daly: float
    #: The interval the run used (productive seconds between saves), if it saved more than once.
    used: float | None
    #: Running goodput (``down`` left out): measured, the model at ``used``, the model at ``daly``.
    measured: float
    model_used: float | None
    model_daly: float
    #: The interval where the model itself peaks (a check on the closed forms).
    model_best: float


def young(mtbf: float, save_cost: float) -> float:
    return math.sqrt(2.0 * mtbf * save_cost)


def daly(mtbf: float, save_cost: float, recovery: float) -> float:
    """Compute seconds between saves at Daly's availability optimum (its period ``Tc`` minus the save)."""
    return math.sqrt(2.0 * (mtbf + recovery) * save_cost + save_cost**2)


def model_goodput(interval: float, *, productive: float, fixed: float, save_cost: float, recovery: float,
                  mtbf: float) -> float:
    """Running goodput of the modelled run at ``interval`` seconds between saves (0 if it could never finish)."""
    if interval <= 0 or productive <= 0:
        return 0.0
    failing = ((interval + save_cost) / 2.0 + recovery) / mtbf
    if failing >= 1.0:
        return 0.0
    wall = (productive * (1.0 + save_cost / interval) + fixed) / (1.0 - failing)
    return productive / wall


def advise(tl: Timeline, mtbf: float | None = None) -> Advice | str:
    """The advice, or why there is none (one line)."""
    if not tl.save_costs:
        return "no save was measured: nothing to base a checkpoint interval on"
    ts = max(sum(tl.save_costs) / len(tl.save_costs), 1e-6)
    running = tl.wall - tl.buckets["down"]
    unplanned = tl.counts.get("unplanned", 0)
    if mtbf is None:
        if unplanned == 0:
            return ("no failure that lost work was observed, so the interval hardly matters for this run; pass "
                    "--mtbf SECONDS (your cluster's mean time between failures) to get one")
        mtbf = running / unplanned
    recovery = sum(tl.recoveries) / len(tl.recoveries) if tl.recoveries else _first_start(tl)
    b = tl.buckets
    productive = b["productive"]
    # What the interval does not change: everything but saves, lost work and the recoveries after failures.
    fixed = max(0.0, running - productive - b["save"] - b["lost"] - recovery * unplanned)
    kw = {"productive": productive, "fixed": fixed, "save_cost": ts, "recovery": recovery, "mtbf": mtbf}
    best = _argmax(lambda x: model_goodput(x, **kw), 1e-3, max(mtbf, 1.0))
    used = tl.save_interval
    d = daly(mtbf, ts, recovery)
    return Advice(save_cost=ts, recovery=recovery, mtbf=mtbf, mtbf_given=unplanned == 0 or mtbf != running / unplanned,
                  young=young(mtbf, ts), daly=d, used=used, measured=tl.running_goodput,
                  model_used=model_goodput(used, **kw) if used else None, model_daly=model_goodput(d, **kw),
                  model_best=best)


def _first_start(tl: Timeline) -> float:
    """No restart was seen: a cold start (startup, rendezvous, restore) stands in for the recovery time."""
    return tl.buckets["startup"] + tl.buckets["rendezvous"] + tl.buckets["restore"]


def _argmax(f: object, lo: float, hi: float) -> float:
    """Golden-section search on a log scale (the model is unimodal in the interval)."""
    assert callable(f)
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(math.exp(c)) >= f(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


def describe(advice: Advice | str) -> list[str]:
    if isinstance(advice, str):
        return [f"checkpoint interval: {advice}"]
    a = advice
    src = "given" if a.mtbf_given else "observed"
    lines = [f"checkpoint interval (save cost {a.save_cost * 1e3:.1f} ms, recovery {a.recovery:.1f} s, MTBF "
             f"{a.mtbf:.0f} s {src}):",
             f"  recommended checkpoint.every_seconds: {a.daly:.1f} (Daly; Young: {a.young:.1f})",
             f"  goodput at that interval (model): {a.model_daly:.1%}"]
    if a.used is not None and a.model_used is not None:
        lines.append(f"  this run saved every {a.used:.1f} s: measured {a.measured:.1%}, model {a.model_used:.1%}")
    return lines
