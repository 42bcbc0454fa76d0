"""Resumable, deterministic data loading.

Promise: a run stopped after the training loop received ``k`` batches and
resumed from :meth:`ResumableLoader.state_dict` receives batch ``k+1`` onward
bit-identically (random augmentation included), and every later epoch too:

* :class:`ResumableSampler`: each epoch's per-rank order is a pure function of
  the configuration and the epoch, so one integer describes the position;
* :class:`SeededDataset`: each sample is made with the global RNGs seeded from
  :func:`derive_seed`, independent of the worker and of earlier draws;
* :class:`ResumableLoader`: counts batches as they are *handed to the training
  loop* (not as workers prefetch) and never draws from torch's global RNG. Its
  position also tells "epoch e's last batch delivered, the ``for`` loop not yet
  ended" from "epoch e+1 begun", so code after the loop (an epoch counter, a
  per-epoch ``scheduler.step()``, an evaluation) runs on resume exactly as it
  did in the uninterrupted run. The position is one global cursor
  (``position.py``), so a run resumed at another world size with the same
  global batch consumes the same samples at every later global step.

Thread/process-safety: no object here is safe to share between threads.
:class:`SeededDataset` also runs in DataLoader workers (each has its own
copy); :class:`ResumableLoader`'s counters live only in the main process.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ftrain.data import position
from ftrain.data.position import Layout, Position
from ftrain.data.sampler import ResumableSampler, default_world
from ftrain.data.seeding import SeededDataset, derive_seed
from ftrain.signals import CATCHABLE_PREEMPTION_SIGNALS

# ``index`` for the DataLoader's own generator seed: -1 wraps to 2**64-1, which
# is never a dataset index, so this stream is separate from every sample's.
_LOADER_STREAM = -1
_END = object()  # sentinel for next(iterator, default)
_PR_SET_PDEATHSIG = 1

def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the rank died between the fork and the prctl
            os._exit(0)


class _WorkerInit:
    """Picklable worker_init_fn: ignore preemption signals, then call the user's.

    Why: preemption signals (SIGTERM, SLURM's SIGUSR1, a terminal's SIGINT) are
    often sent to the whole process group. A worker that dies (or, after fork, runs a copy of
    the main process's Python handler) makes the main process's next fetch fail
    while it is trying to save its final checkpoint. Ignoring them keeps
    workers alive; they still exit when the main process shuts the loader down
    or dies.

    On Linux a worker also dies with its rank (PR_SET_PDEATHSIG, SIGKILL). A forked worker holds copies of
    its rank's sockets, the process group's included: when the rank is SIGKILLed, its peers see the
    connection close only once every copy is closed, and DataLoader's own parent watchdog looks every
    5 s. Measured: the surviving ranks' collectives failed 5.0 s after the kill without this, at once with it.
    """

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn
        self.parent = os.getpid()  # the rank: workers are started from it

    def __call__(self, worker_id: int) -> None:
        _die_with_parent(self.parent)
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

    Batching. An epoch's order is cut into *global batches* of
    ``global_batch_size`` samples (default ``batch_size`` x world size): the
    samples of one optimizer step over all ranks. Rank ``r`` of ``W`` takes
    every ``W``-th sample of each, as ``accumulation`` batches of
    ``batch_size``. The epoch's tail is padded by repeating from the start of
    its order to a whole global batch, or with ``drop_last`` the incomplete
    global batch is dropped; every batch is full. So the samples of global step
    ``s`` do not depend on ``W`` (see ``position.py``; ``session.batch_plan``
    picks ``batch_size`` and the accumulation for a constant global batch).

    Semantics (all per rank). The position is ``(epoch, consumed)``, with
    ``D`` the samples this rank delivers in this epoch; saved as the global
    cursor ``consumed x W`` (plus the ``base`` a resize re-striped from):

    * ``epoch``: the epoch the batches currently being delivered belong to.
    * ``consumed``: samples of this rank's epoch list that have been *handed to
      the training loop* in ``epoch``. It is incremented by the batch's size
      before the batch is yielded, so code in the loop body after receiving
      ``k`` batches sees the count of all ``k``. Prefetched batches not yet
      handed over are not counted; they are recomputed on resume. Always
      ``0 <= consumed <= D`` and a multiple of ``batch_size`` unless ``== D``.
    * ``consumed == D > 0`` means "epoch ``epoch``'s last batch was delivered,
      and the loop that delivered it has not ended by exhaustion" (the caller
      holds the batch, or ``break``-ed out after it). The position stays so
      until an iterator *ends*: the next ``next()`` on the same iterator, or
      the first ``next()`` of a new ``for`` loop, delivers nothing, sets
      ``(epoch + 1, 0)`` and then raises StopIteration.
    * Hence the only transition to a new epoch is a loop running out: code
      after a ``for batch in loader:`` that ran out sees ``(epoch + 1, 0)``. A
      ``for`` loop continues the current epoch from the next undelivered
      batch; after a ``break`` (mid-epoch or after the last batch) the next
      loop finishes that epoch. So work that must run once per epoch, in a
      script that may ``break``, belongs in the loop's ``else:`` clause (run
      only when the loop ran out). An epoch with no batch at all (``D == 0``)
      yields nothing and is still counted.
    * :meth:`state_dict` records the position as it is, never normalised. So a
      save in the loop body at an epoch's last batch (``checkpoint.every_steps``
      equal to the steps per epoch) restores to ``(e, D)``: the first resumed
      ``for`` loop ends at once with no batch, the code after it runs as it did
      uninterrupted, and the next loop is epoch ``e + 1``.
    * ``len(loader)`` is the batch count of a full epoch whatever the position
      (like ``len(DataLoader)``): a loop that resumes mid-epoch yields fewer,
      one that ends an already delivered epoch yields none.
    * There is no ``set_epoch``: the loader keeps its own epoch and sets the
      fields of :attr:`sampler` before each epoch, so a DistributedSampler-style
      ``loader.sampler.set_epoch(e)`` has no effect.

    Hence: state taken after the loop received ``k`` batches, loaded into a
    fresh loader built with the same arguments, yields batch ``k+1`` onward
    identically (augmentation included when ``seed_samples``), then identical
    epochs, and its loops end where the original's did. Without
    ``seed_samples`` the order is still exact but random augmentation in
    workers is not reproduced mid-epoch.

    Iterating never draws from torch's global RNG: the DataLoader gets its own
    generator, reseeded from ``(seed, epoch)`` before each epoch's DataLoader
    iterator is made. Only the newest iterator is valid: an older one raises
    RuntimeError at its next ``next()`` without touching the loader. Not
    thread-safe.
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
        global_batch_size: int | None = None,
        allow_global_batch_change: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas is None or rank is None:
            world, world_rank = default_world()
            num_replicas = world if num_replicas is None else num_replicas
            rank = world_rank if rank is None else rank
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.seed_samples = bool(seed_samples)
        self._layout = Layout(seed=self.seed, dataset_len=len(dataset), shuffle=bool(shuffle), drop_last=self.drop_last,
                              num_replicas=int(num_replicas), rank=int(rank), batch_size=self.batch_size,
                              global_batch_size=int(global_batch_size or self.batch_size * int(num_replicas)))
        self._allow_batch_change = bool(allow_global_batch_change)
        self._epoch, self._base, self._consumed = 0, 0, 0
        self._sampler = self._make_sampler()
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
    def cursor(self) -> int:
        """Samples of this epoch consumed over all ranks (at an optimizer step: the first ``cursor`` of its order)."""
        return self._base + self._consumed * self._layout.num_replicas

    @property
    def global_batch_size(self) -> int:
        return self._layout.global_batch_size

    @property
    def accumulation(self) -> int:
        """Batches per rank per global step: accumulate gradients over this many, then step the optimizer."""
        return self._layout.accumulation

    @property
    def sampler(self) -> ResumableSampler:
        return self._sampler

    def __len__(self) -> int:
        """Batches in a full epoch for this rank, whatever the position (a resumed loop may yield fewer)."""
        return self._layout.rank_samples(0) // self.batch_size

    # -- position arithmetic ---------------------------------------------
    def _make_sampler(self) -> ResumableSampler:
        lay = self._layout
        return ResumableSampler(lay.dataset_len, num_replicas=lay.num_replicas, rank=lay.rank, shuffle=lay.shuffle,
                                seed=lay.seed, drop_last=lay.drop_last, granule=lay.global_batch_size, base=self._base)

    def _set(self, epoch: int, base: int, consumed: int) -> None:
        if base != self._base:
            self._base = base
            self._sampler = self._make_sampler()
        self._epoch, self._consumed = epoch, consumed

    def _deliverable(self) -> int:
        """Samples this rank delivers in this epoch from ``base`` (whole batches: the tail is padded or dropped
        at global-batch granularity)."""
        return self._sampler.num_samples

    def _delivered_all(self) -> bool:
        """True from the handing-out of the epoch's last batch until its loop ends (``consumed == D > 0``)."""
        return self._consumed > 0 and self._consumed >= self._deliverable()

    def _batches(self) -> list[list]:
        """Keys of this epoch's remaining batches, from position ``consumed``."""
        self._sampler.epoch, self._sampler.start = self._epoch, self._consumed
        rest = list(self._sampler)
        bs = self.batch_size
        out: list[list[Any]] = [rest[i : i + bs] for i in range(0, len(rest), bs)]
        if self.seed_samples:
            out = [[(self._epoch, i) for i in b] for b in out]
        return out

    # -- iteration -------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        # A plain method (not a generator) so older iterators are invalidated at iter() time, not at the first
        # next(). It never moves the position: an epoch whose last batch was delivered is ended by this
        # iterator running out (yielding nothing), so the caller's loop ends where the uninterrupted one did.
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[Any]:
        # Before touching the shared schedule or DataLoader: a stale iterator started late must not clobber
        # the newer one's (with persistent workers they share one DataLoader iterator).
        self._check_current(generation)
        if self._delivered_all() or not self._deliverable():
            # Nothing left: end the epoch without starting an empty DataLoader iteration (and its workers).
            self._set(self._epoch + 1, 0, 0)
            return
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
            # state_dict() must already include it. After the last batch this
            # is (epoch, D), "delivered, loop not ended", until the next next().
            self._consumed += size
            yield batch
        self._check_current(generation)
        # Drain to StopIteration so non-persistent workers shut down now.
        if next(it, _END) is not _END:
            raise RuntimeError("DataLoader yielded more batches than scheduled")
        # The caller's loop ends with this StopIteration: only now is the next epoch begun.
        self._set(self._epoch + 1, 0, 0)

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("stale ResumableLoader iterator: a newer iter() or load_state_dict() replaced it")

    # -- state -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position as it is (see the class docstring): the epoch, the global ``cursor`` and
        ``base``, plus the layout (fingerprint, world size, rank, batch sizes).

        An epoch whose last batch was delivered is kept as such, not reported as
        the next epoch's start: a restore must end that loop before it starts
        the next epoch.
        """
        return position.to_state(self._layout, Position(self._epoch, self._base, self._consumed))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (possibly at another world size); call before iterating.

        At the saving run's world size and global batch the position is taken
        as saved. At another one the saved cursor must lie on a global step
        boundary, and the rest of the epoch is re-striped over this run's ranks
        (see ``position.py``). Version 1 and 2 states (per-rank counts) load at
        their original world size only; version 1's finished epoch resumes at
        the next epoch's start, as that version did.

        Raises :class:`StateMismatch` (naming the field, saved and current
        value) for an unknown version, a missing field, a fingerprint field that
        differs, a changed global batch (unless built with
        ``allow_global_batch_change``), or an impossible position. Invalidates
        any iterator created earlier.
        """
        pos = position.from_state(state, self._layout, allow_global_batch_change=self._allow_batch_change)
        self._set(pos.epoch, pos.base, pos.consumed)
        self._generation += 1

    @staticmethod
    def resize_state(states: Sequence[dict[str, Any]], world_size: int, rank: int) -> dict[str, Any]:
        """The state each rank of a resized run loads, from every old rank's (``Session.restore`` calls it).

        The old ranks saved one global cursor; they must agree on it. The
        returned state is loaded by :meth:`load_state_dict`, which re-stripes.
        """
        return position.agree(states)
