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

import os
import random
import signal
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ftrain.errors import StateMismatch

try:  # numpy is optional; its global RNG is only managed when it is present.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed in CI
    _np = None  # type: ignore[assignment]

__all__ = ["derive_seed", "ResumableSampler", "SeededDataset", "ResumableLoader"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STATE_VERSION = 1
# ``index`` for the DataLoader's own generator seed: -1 wraps to 2**64-1, which
# is never a dataset index, so this stream is separate from every sample's.
_LOADER_STREAM = -1
_END = object()  # sentinel for next(iterator, default)


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood 2014) on a 64-bit int."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed for sample ``index`` of ``epoch`` under ``seed``.

    Formula, all arithmetic mod 2**64, ``m`` = one splitmix64 step::

        m(z): z += 0x9E3779B97F4A7C15; z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9
              z = (z ^ z >> 27) * 0x94D049BB133111EB; return z ^ z >> 31
        h = m(seed mod 2**64)
        h = m(h XOR (epoch mod 2**64))
        h = m(h XOR (index mod 2**64))
        return h >> 1            # in [0, 2**63)

    Pure integer arithmetic: the result is the same in every process, on every
    platform and independent of ``PYTHONHASHSEED``. Negative inputs are taken
    mod 2**64. 63 bits so the value fits a signed int64 (torch, numpy).
    """
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h >> 1


def _default_world() -> tuple[int, int]:
    """(world_size, rank) from torch.distributed if initialised, else env, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


class ResumableSampler(Sampler[int]):
    """Per-rank epoch order, a pure function of the constructor arguments and ``epoch``.

    Invariants (same arithmetic as ``torch.utils.data.DistributedSampler``):

    * the global order of epoch ``e`` is ``randperm(dataset_len)`` from a
      ``torch.Generator`` seeded with ``seed + e`` (``range`` when not shuffling);
    * without ``drop_last`` it is padded by repeating from its start to a
      multiple of ``num_replicas``; with ``drop_last`` it is truncated;
    * rank ``r`` takes ``order[r::num_replicas]``; every rank gets exactly
      ``num_samples`` indices.

    ``epoch`` and ``start`` are plain fields set by the owner (the loader);
    iteration yields ``indices(epoch)[start:]``. Nothing here counts
    consumption. Uses only a private generator, never the global RNG.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            world, world_rank = _default_world()
            num_replicas = world if num_replicas is None else num_replicas
            rank = world_rank if rank is None else rank
        if int(dataset_len) < 0 or int(num_replicas) < 1 or not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"bad sampler: dataset_len={dataset_len}, num_replicas={num_replicas}, rank={rank}")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start = 0
        n, r = self.dataset_len, self.num_replicas
        self.num_samples = n // r if self.drop_last else -(-n // r)  # -(-a // b) == ceil(a / b)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """DistributedSampler-compatible setter; also resets ``start`` to 0."""
        self.epoch = int(epoch)
        self.start = 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's complete index list for ``epoch`` (length ``num_samples``)."""
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator()
            # Masked so a negative seed+epoch is still accepted; identical to
            # DistributedSampler for the usual non-negative seeds.
            g.manual_seed((self.seed + int(epoch)) & _MASK64)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        if pad > 0:
            # Repeat from the start (several times when n < num_replicas).
            order += (order * (-(-pad // n)))[:pad]
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _seed_globals(s: int) -> None:
    random.seed(s)
    # Seed only the CPU generator: torch.manual_seed would also reseed (and
    # lazily initialise) every CUDA generator.
    torch.default_generator.manual_seed(s)
    if _np is not None:
        # Legacy global RandomState takes 32-bit words; pass all 63 bits.
        _np.random.seed([s & 0xFFFFFFFF, s >> 32])


class SeededDataset(Dataset):
    """Map-style wrapper whose keys are ``(epoch, index)``.

    ``self[(epoch, index)]`` returns ``dataset[index]`` computed with Python
    ``random``, NumPy's global RNG (if NumPy is importable) and torch's CPU
    generator all seeded from ``derive_seed(seed, epoch, index)``: a sample's
    random augmentation depends only on (seed, epoch, index), not on the worker
    that produced it nor on anything drawn before.

    In the main process (``get_worker_info() is None``, i.e. ``num_workers=0``)
    the three global RNG states are saved before and restored after the call,
    so the training loop's RNG stream is untouched. In a worker process the
    globals belong to the worker, so they are left seeded. The save/restore is
    not thread-safe: another thread drawing from the global RNGs during a
    main-process fetch would see the seeded state.
    """

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = derive_seed(self.seed, epoch, index)
        if get_worker_info() is not None:  # the worker's own globals: no restore
            _seed_globals(s)
            return self.dataset[index]
        py_state, torch_state = random.getstate(), torch.default_generator.get_state()
        np_state = _np.random.get_state() if _np is not None else None
        try:
            _seed_globals(s)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.default_generator.set_state(torch_state)
            if _np is not None:
                _np.random.set_state(np_state)


class _WorkerInit:
    """Picklable worker_init_fn: ignore preemption signals, then call the user's.

    Why: SIGTERM/SIGINT/SIGUSR1 from a scheduler or a terminal are often sent to
    the whole process group. A worker that dies (or, after fork, runs a copy of
    the main process's Python handler) makes the main process's next fetch fail
    while it is trying to save its final checkpoint. Ignoring them keeps
    workers alive; they still exit when the main process shuts the loader down
    or dies (DataLoader's parent watchdog polls the parent pid).
    """

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
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
        out = [rest[i : i + bs] for i in range(0, len(rest), bs)]
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
