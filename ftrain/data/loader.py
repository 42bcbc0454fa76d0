"""Resumable, deterministic data loading.

Promise: a run stopped after the training loop received ``k`` batches and
resumed from :meth:`ResumableLoader.state_dict` receives batch ``k+1`` onward
bit-identically (random augmentation included), and every later epoch too:

* :class:`ResumableSampler`: each epoch's per-rank order is a pure function of
  the configuration and the epoch, so one integer describes the position;
* :class:`SeededDataset`: each sample is made with the global RNGs seeded from
  :func:`derive_seed`, independent of the worker and of earlier draws;
* :class:`ResumableLoader`: counts batches as they are *handed to the training
  loop* (not as workers prefetch) and never draws from torch's global RNG.

Thread/process-safety: no object here is safe to share between threads.
:class:`SeededDataset` also runs in DataLoader workers (each has its own
copy); :class:`ResumableLoader`'s counters live only in the main process.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ftrain.data.sampler import ResumableSampler
from ftrain.data.seeding import SeededDataset, derive_seed
from ftrain.errors import StateMismatch
from ftrain.signals import CATCHABLE_PREEMPTION_SIGNALS

_STATE_VERSION = 1
# ``index`` for the DataLoader's own generator seed: -1 wraps to 2**64-1, which
# is never a dataset index, so this stream is separate from every sample's.
_LOADER_STREAM = -1
_END = object()  # sentinel for next(iterator, default)

class _WorkerInit:
    """Picklable worker_init_fn: ignore preemption signals, then call the user's.

    Why: preemption signals (SIGTERM, SLURM's SIGUSR1, a terminal's SIGINT) are
    often sent to the whole process group. A worker that dies (or, after fork, runs a copy of
    the main process's Python handler) makes the main process's next fetch fail
    while it is trying to save its final checkpoint. Ignoring them keeps
    workers alive; they still exit when the main process shuts the loader down
    or dies (DataLoader's parent watchdog polls the parent pid).
    """

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for name in CATCHABLE_PREEMPTION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:  # SIGUSR1 does not exist on Windows
                signal.signal(sig, signal.SIG_IGN)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class _BatchSchedule(Sampler[list]):
    """Batch sampler whose batches the loader sets before each ``iter()``.

    Long-lived so one DataLoader (and its persistent workers) is reused; it is
    iterated in the main process only.
    """

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader:
    """A DataLoader wrapper whose position survives a restart exactly.

    Semantics (all per rank):

    * ``epoch``: the epoch the batches currently being delivered belong to.
    * ``consumed``: samples of this rank's epoch list that have been *handed to
      the training loop* in ``epoch``. It is incremented by the batch's size
      before the batch is yielded, so code in the loop body after receiving
      ``k`` batches sees the count of all ``k``. Prefetched batches not yet
      handed over are not counted; they are recomputed on resume.
    * An epoch is finished when no batch remains (``drop_last`` drops a final
      batch smaller than ``batch_size``). When the generator finds its epoch
      finished it sets ``epoch += 1, consumed = 0``; if ``__iter__`` is called
      on a finished epoch it advances first. One ``for`` loop = one epoch
      (an epoch with no batch at all yields nothing and is still counted).
    * :meth:`state_dict` records the position of the *next* batch: for a
      finished epoch it reports ``(epoch + 1, 0)``. Mid-epoch ``consumed`` is
      always a multiple of ``batch_size``.

    Hence: state taken after the loop received ``k`` batches, loaded into a
    fresh loader built with the same arguments, yields batch ``k+1`` onward
    identically (augmentation included when ``seed_samples``), then identical
    epochs. Without ``seed_samples`` the order is still exact but random
    augmentation in workers is not reproduced mid-epoch.

    Iterating never draws from torch's global RNG: the DataLoader gets its own
    generator, reseeded from ``(seed, epoch)`` before each ``iter()``. Only
    the newest iterator is valid; resuming an older one raises RuntimeError.
    Not thread-safe.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        seed_samples: bool = True,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.seed_samples = bool(seed_samples)
        # The sampler pads (never drops) so every rank gets the same number of
        # samples and hence the same number of batches; our drop_last is
        # about the final incomplete batch only.
        self._sampler = ResumableSampler(
            len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=False
        )
        self._epoch, self._consumed = 0, 0
        self._generation = 0  # bumped by __iter__/load_state_dict; stale iterators stop
        self._schedule = _BatchSchedule()
        self._generator = torch.Generator()
        self._dataloader = DataLoader(
            SeededDataset(dataset, self.seed) if self.seed_samples else dataset,
            batch_sampler=self._schedule,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=_WorkerInit(worker_init_fn),
            generator=self._generator,
        )

    # -- read-only views -------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def sampler(self) -> ResumableSampler:
        return self._sampler

    def __len__(self) -> int:
        """Batches in a full epoch for this rank."""
        n = self._sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- position arithmetic ---------------------------------------------
    def _deliverable(self) -> int:
        """Samples this rank delivers in a full epoch (the last partial batch dropped or not)."""
        return len(self) * self.batch_size if self.drop_last else self._sampler.num_samples

    def _finished(self) -> bool:
        """True when batches of this epoch were delivered and none remain."""
        return self._consumed > 0 and self._consumed >= self._deliverable()

    def _batches(self) -> list[list]:
        """Keys of this epoch's remaining batches, from position ``consumed``."""
        self._sampler.epoch, self._sampler.start = self._epoch, self._consumed
        rest = list(self._sampler)
        bs = self.batch_size
        out: list[list[Any]] = [rest[i : i + bs] for i in range(0, len(rest), bs)]
        if self.drop_last and out and len(out[-1]) < bs:
            out.pop()
        if self.seed_samples:
            out = [[(self._epoch, i) for i in b] for b in out]
        return out

    # -- iteration -------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        # A plain method (not a generator) so the advance and the invalidation
        # of older iterators happen at iter() time, not at the first next().
        if self._finished():
            self._epoch, self._consumed = self._epoch + 1, 0
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[Any]:
        batches = self._batches()
        sizes = [len(b) for b in batches]
        self._schedule.batches = batches
        # Reseed the private generator: DataLoader draws its worker base seed
        # from it at iter(); the stock default would draw from the global RNG
        # and shift the training stream differently in a resumed run.
        self._generator.manual_seed(derive_seed(self.seed, self._epoch, _LOADER_STREAM))
        it = iter(self._dataloader)
        for size in sizes:
            # Checked before touching the DataLoader iterator: with persistent
            # workers it is shared with the newer iterator.
            self._check_current(generation)
            batch = next(it, _END)
            if batch is _END:
                raise RuntimeError(f"DataLoader ended early; expected {len(sizes)} batches")
            # Count before yielding: once the caller holds batch k,
            # state_dict() must already include it.
            self._consumed += size
            yield batch
        self._check_current(generation)
        # Drain to StopIteration so non-persistent workers shut down now.
        if next(it, _END) is not _END:
            raise RuntimeError("DataLoader yielded more batches than scheduled")
        self._epoch, self._consumed = self._epoch + 1, 0

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("stale ResumableLoader iterator: a newer iter() or load_state_dict() replaced it")

    # -- state -----------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        s = self._sampler
        return {
            "seed": self.seed,
            "num_replicas": s.num_replicas,
            "rank": s.rank,
            "dataset_len": s.dataset_len,
            "batch_size": self.batch_size,
            "shuffle": s.shuffle,
            "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next batch plus identity fields."""
        epoch, consumed = self._epoch, self._consumed
        if self._finished():
            epoch, consumed = epoch + 1, 0
        return {"version": _STATE_VERSION, "epoch": epoch, "consumed": consumed, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; call before iterating.

        Raises :class:`StateMismatch` (naming the field, saved and current
        value) for an unknown version, a missing field, a field that differs
        from this loader's configuration, or an impossible position.
        Invalidates any iterator created earlier.
        """
        version = state.get("version")
        if version != _STATE_VERSION:
            raise StateMismatch(
                f"loader state field 'version': saved {version!r}, current {_STATE_VERSION!r} "
                "(state written by an incompatible ftrain version)"
            )
        for name, current in self._identity().items():
            if name not in state:
                raise StateMismatch(f"loader state field {name!r}: missing from saved state, current {current!r}")
            saved = state[name]
            if type(saved) is not type(current) or saved != current:
                raise StateMismatch(
                    f"loader state field {name!r}: saved {saved!r}, current {current!r} "
                    "(build the loader with the saved setting, or start without resuming)"
                )
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if type(epoch) is not int or epoch < 0:
            raise StateMismatch(f"loader state field 'epoch': saved {epoch!r}, current must be an int >= 0")
        deliverable = self._deliverable()
        if (
            type(consumed) is not int
            or not 0 <= consumed <= deliverable
            or (consumed % self.batch_size and consumed != deliverable)
        ):
            raise StateMismatch(
                f"loader state field 'consumed': saved {consumed!r}, current epoch holds "
                f"{deliverable} samples in batches of {self.batch_size}"
            )
        self._epoch, self._consumed = epoch, consumed
        if self._finished():  # normalise a hand-made end-of-epoch position
            self._epoch, self._consumed = epoch + 1, 0
        self._generation += 1
