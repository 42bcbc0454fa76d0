"""Per-sample seeding: the same random augmentation for a sample whichever process fetches it.

:func:`derive_seed` is a pure function of (seed, epoch, index); :class:`SeededDataset`
runs each sample with the global RNGs seeded from it. Worker side (runs in
DataLoader workers too). Not thread-safe: see :class:`SeededDataset`.
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

try:  # numpy is optional; its global RNG is only managed when it is present.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed in CI
    _np = None  # type: ignore[assignment]

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood 2014) on a 64-bit int."""
    x = (x + _GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
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
    h = _splitmix64(int(seed) & MASK64)
    h = _splitmix64(h ^ (int(epoch) & MASK64))
    h = _splitmix64(h ^ (int(index) & MASK64))
    return h >> 1


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
