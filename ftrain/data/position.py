"""Worker side: a loader's position in an epoch, and how a saved one maps onto this run's layout.

Pure: no I/O, no torch. The loader (``loader.py``) owns the iteration; this
module owns the arithmetic that makes a position survive a restart at the same
world size *and* at another one:

* the epoch's global order (one permutation, whatever the world size) is cut
  into global batches of ``global_batch_size`` samples; global step ``s`` is
  ``order[base + s*G : base + (s+1)*G]`` (the tail padded or dropped at that
  granularity), and rank ``r`` of ``W`` takes every ``W``-th sample of it;
* so the position is one global *cursor*: samples consumed this epoch over
  all ranks (``base + consumed * W``). At an optimizer step boundary the
  consumed samples are exactly ``order[:cursor]``, and a run at another world
  size (or global batch) continues with ``order[cursor:]`` re-striped over its
  ranks: ``base`` becomes the cursor. With the same global batch the samples of
  every later global step are those of the uninterrupted run.

State versions: 3 (this one) records the cursor; 2 and 1 (per-rank counts)
are read at their original world size only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftrain.data.sampler import padded_length
from ftrain.errors import StateMismatch

VERSION = 3
READABLE = (1, 2, 3)
#: Fields that must match for a saved cursor to name the same samples: the order's fingerprint.
FINGERPRINT = ("seed", "dataset_len", "shuffle", "drop_last")


@dataclass(frozen=True)
class Layout:
    """What one rank's loader is: the order's fingerprint and how it is cut and striped."""

    seed: int
    dataset_len: int
    shuffle: bool
    drop_last: bool
    num_replicas: int
    rank: int
    batch_size: int
    global_batch_size: int

    def __post_init__(self) -> None:
        w, b, g = self.num_replicas, self.batch_size, self.global_batch_size
        if g % w or (g // w) % b:
            raise ValueError(
                f"global_batch_size={g} must split into {w} rank(s) x a whole number of batches of {b} "
                f"(per rank {g / w:g}); use session.batch_plan() to choose batch_size and accumulation")

    @property
    def accumulation(self) -> int:
        """Batches each rank takes per global step (gradient accumulation steps)."""
        return self.global_batch_size // self.num_replicas // self.batch_size

    def rank_samples(self, base: int) -> int:
        """Samples this rank is handed from position ``base`` to the epoch's end."""
        return padded_length(self.dataset_len, base, self.global_batch_size, self.drop_last) // self.num_replicas

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "dataset_len": self.dataset_len, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas, "rank": self.rank,
                "batch_size": self.batch_size, "global_batch_size": self.global_batch_size}


@dataclass(frozen=True)
class Position:
    """``consumed`` samples handed to the training loop by this rank since ``base``, in ``epoch``."""

    epoch: int
    base: int
    consumed: int

    def cursor(self, layout: Layout) -> int:
        return self.base + self.consumed * layout.num_replicas


def to_state(layout: Layout, pos: Position) -> dict[str, Any]:
    return {"version": VERSION, "epoch": pos.epoch, "cursor": pos.cursor(layout), "base": pos.base,
            **layout.identity()}


def agree(states: Sequence[Any]) -> dict[str, Any]:
    """The one state every old rank's loader saved the same position in (a resize loads it on each new rank).

    Raises :class:`StateMismatch` naming the first rank whose position differs: ranks that step in lockstep
    cannot disagree, so the checkpoint was not taken at a step boundary of a synchronous job.
    """
    if not states or not all(isinstance(s, dict) for s in states):
        raise StateMismatch("loader state: expected one saved state per rank")
    first = states[0]
    for r, s in enumerate(states):
        if s.get("version") != VERSION:
            raise StateMismatch(f"loader state of rank {r}: version {s.get('version')!r}; a checkpoint resumes at "
                                f"another world size only from loader state version {VERSION} (ftrain 0.2 on): "
                                "resume at the original number of ranks once and save")
        for key in ("epoch", "cursor", "base", *FINGERPRINT, "global_batch_size"):
            if s.get(key) != first.get(key):
                raise StateMismatch(f"loader state: rank {r} saved {key}={s.get(key)!r}, rank 0 {first.get(key)!r}; "
                                    "the ranks were not at the same step when it was saved")
    return dict(first)


def from_state(state: dict[str, Any], layout: Layout, *, allow_global_batch_change: bool = False) -> Position:
    """The position ``state`` (saved by ``to_state``, or a version 1/2 loader) means in ``layout``.

    Same world size and global batch: the saved position as is (mid-step too).
    Otherwise the saved cursor must be at a global step boundary (or the
    epoch's end); the rest of the epoch is re-striped from it. Raises
    :class:`StateMismatch` naming the field, the saved and the current value.
    """
    version = state.get("version")
    if type(version) is not int or version not in READABLE:
        raise StateMismatch(f"loader state field 'version': saved {version!r}, current {VERSION!r} (readable: "
                            f"{', '.join(map(str, READABLE))}; state written by an incompatible ftrain version)")
    current = layout.identity()
    for name in FINGERPRINT:
        _same(state, name, current[name], "build the loader with the saved setting, or start without resuming")
    epoch = state.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise StateMismatch(f"loader state field 'epoch': saved {epoch!r}, current must be an int >= 0")
    if version < 3:
        return _from_per_rank(state, version, epoch, layout)
    w, g = _int(state, "num_replicas", 1), _int(state, "global_batch_size", 1)
    if g != layout.global_batch_size and not allow_global_batch_change:
        raise StateMismatch(
            f"loader state field 'global_batch_size': saved {g}, current {layout.global_batch_size} "
            f"({layout.num_replicas} rank(s) x {layout.global_batch_size // layout.num_replicas}); keep the global "
            "batch constant across world sizes: build the loader with session.batch_plan(...).loader_args()")
    base, cursor = _int(state, "base", 0), _int(state, "cursor", 0)
    total = padded_length(layout.dataset_len, base, g, layout.drop_last)
    if cursor < base or (cursor - base) % w or cursor - base > total:
        raise StateMismatch(f"loader state field 'cursor': saved {cursor}, impossible from base {base} with {w} "
                            f"rank(s) and {total} samples left in the epoch")
    if w == layout.num_replicas and g == layout.global_batch_size:
        _same(state, "rank", layout.rank, "each rank must load its own state")
        return _checked(Position(epoch, base, (cursor - base) // w), layout)
    if cursor - base == total:  # the epoch's last step was delivered: nothing is left for the new ranks
        return Position(epoch, max(cursor, layout.dataset_len), 0)
    if (cursor - base) % g:
        raise StateMismatch(
            f"loader state field 'cursor': saved {cursor}, inside a global step of {g} samples; a checkpoint resumes "
            "at another world size or global batch only from an optimizer step (session.step after the last "
            "accumulation batch)")
    return Position(epoch, cursor, 0)


def _from_per_rank(state: dict[str, Any], version: int, epoch: int, layout: Layout) -> Position:
    """Versions 1 and 2: a per-rank count at the saving run's world size; read at that world size only."""
    for name in ("num_replicas", "rank", "batch_size"):
        _same(state, name, layout.identity()[name], f"a version {version} loader state resumes only with the "
              "original world size and batch size (resume like that once, then save)")
    consumed = state.get("consumed")
    w, b, n = layout.num_replicas, layout.batch_size, layout.dataset_len
    per_rank = -(-n // w)  # the old sampler padded to a multiple of the world size, then batched per rank
    old_total = per_rank // b * b if layout.drop_last else per_rank
    if type(consumed) is not int or not 0 <= consumed <= old_total or (consumed % b and consumed != old_total):
        raise StateMismatch(f"loader state field 'consumed': saved {consumed!r}, current epoch holds {old_total} "
                            f"samples in batches of {b}")
    if consumed == old_total and consumed > 0:
        # Version 2: "last batch delivered, loop not ended"; version 1 meant the next epoch's start.
        if version == 1:
            return Position(epoch + 1, 0, 0)
        end = layout.rank_samples(0)
        return Position(epoch, 0, end) if end else Position(epoch, n, 0)
    return _checked(Position(epoch, 0, consumed), layout)


def _checked(pos: Position, layout: Layout) -> Position:
    total = layout.rank_samples(pos.base)
    if pos.consumed > total or (pos.consumed % layout.batch_size and pos.consumed != total):
        raise StateMismatch(f"loader state field 'cursor': {pos.consumed} of this rank's {total} samples consumed, "
                            f"not a whole number of batches of {layout.batch_size}")
    return pos


def _same(state: dict[str, Any], name: str, current: Any, fix: str) -> None:
    if name not in state:
        raise StateMismatch(f"loader state field {name!r}: missing from saved state, current {current!r}")
    saved = state[name]
    if type(saved) is not type(current) or saved != current:
        raise StateMismatch(f"loader state field {name!r}: saved {saved!r}, current {current!r} ({fix})")


def _int(state: dict[str, Any], name: str, low: int) -> int:
    value = state.get(name)
    if type(value) is not int or value < low:
        raise StateMismatch(f"loader state field {name!r}: saved {value!r}, expected an int >= {low}")
    return value
