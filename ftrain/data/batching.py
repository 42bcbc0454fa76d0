"""Worker side: how a constant global batch is split over this run's ranks (a pure function).

A job that may resume at another world size keeps its global batch (the
samples of one optimizer step over all ranks) constant: then the loader's
global step ``s`` holds the same samples whatever the world size
(``position.py``), and the optimizer sees the same effective batch. What
changes is the per-rank share, taken as ``accumulation`` micro-batches of
``micro_batch`` samples, each within the memory bound the caller gives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ftrain.errors import UsageError

log = logging.getLogger("ftrain")

#: ``data.on_uneven_batch`` values.
ERROR, NEAREST = "error", "nearest"


@dataclass(frozen=True)
class BatchPlan:
    """The per-rank batch and gradient-accumulation steps that make ``global_batch`` at ``world_size`` ranks.

    Invariant: ``micro_batch * accumulation * world_size == global_batch``.
    ``requested`` is the global batch asked for; it differs from ``global_batch``
    only under ``data.on_uneven_batch: nearest``.
    """

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int
    requested: int
    #: Made under ``data.on_uneven_batch: nearest``: the loader then accepts a checkpoint saved with
    #: another global batch (one of this policy's adjusted ones, or the requested one), re-striping from it.
    flexible: bool = False

    @property
    def per_rank(self) -> int:
        """Samples each rank contributes to one optimizer step."""
        return self.micro_batch * self.accumulation

    @property
    def adjusted(self) -> bool:
        return self.global_batch != self.requested

    def loader_args(self) -> dict[str, Any]:
        """Keyword arguments for :class:`ftrain.ResumableLoader` that implement this plan."""
        return {"batch_size": self.micro_batch, "global_batch_size": self.global_batch,
                "allow_global_batch_change": self.flexible}


def plan_batches(global_batch: int, world_size: int, max_micro_batch: int | None = None,
                 on_uneven: str = ERROR) -> BatchPlan:
    """Split ``global_batch`` over ``world_size`` ranks in micro-batches of at most ``max_micro_batch``.

    The micro-batch is the largest divisor of the per-rank share that fits
    ``max_micro_batch`` (no limit: the whole share, no accumulation). A global
    batch that does not divide by the world size raises :class:`UsageError`
    naming both and the world sizes that would work, unless ``on_uneven`` is
    ``"nearest"``: then the largest smaller global batch that divides is used,
    with a warning (each sample is still seen once per epoch, but the samples
    of each step differ from a run at the original world size).
    """
    if type(global_batch) is not int or global_batch < 1 or type(world_size) is not int or world_size < 1:
        raise UsageError(f"batch plan: global_batch={global_batch!r} and world_size={world_size!r} must be ints >= 1")
    if max_micro_batch is not None and (type(max_micro_batch) is not int or max_micro_batch < 1):
        raise UsageError(f"batch plan: max_micro_batch={max_micro_batch!r} must be an int >= 1 (or None)")
    if on_uneven not in (ERROR, NEAREST):
        raise UsageError(f"batch plan: on_uneven={on_uneven!r}; expected {ERROR!r} or {NEAREST!r}")
    used = global_batch
    if global_batch % world_size:
        if on_uneven == ERROR or global_batch < world_size:
            fits = [w for w in range(1, min(global_batch, 4 * world_size) + 1) if global_batch % w == 0]
            raise UsageError(
                f"the global batch of {global_batch} cannot be split evenly over {world_size} ranks (world sizes "
                f"that can: {', '.join(map(str, fits))}); run at one of those, or change the global batch (a "
                "fresh run), or set data.on_uneven_batch: nearest to use the nearest smaller global batch")
        used = global_batch // world_size * world_size
        log.warning("the global batch of %d cannot be split evenly over %d ranks: using %d (%d per rank) as "
                    "data.on_uneven_batch is 'nearest'; the samples of each step now differ from the run's at "
                    "its original world size (each sample is still seen once per epoch)", global_batch, world_size,
                    used, used // world_size)
    share = used // world_size
    cap = share if max_micro_batch is None else min(share, max_micro_batch)
    micro = max(d for d in range(1, cap + 1) if share % d == 0)
    return BatchPlan(global_batch=used, world_size=world_size, micro_batch=micro, accumulation=share // micro,
                     requested=global_batch, flexible=on_uneven == NEAREST)
