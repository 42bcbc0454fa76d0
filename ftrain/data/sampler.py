"""The per-rank order of an epoch, a pure function of the configuration and the epoch.

Worker side. Uses only a private generator, never the global RNG.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ftrain import envvars
from ftrain.data.seeding import MASK64


def default_world() -> tuple[int, int]:
    """(world_size, rank) from torch.distributed if initialised, else env, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get(envvars.WORLD_SIZE, "1")), int(os.environ.get(envvars.RANK, "0"))


def padded_length(dataset_len: int, base: int, granule: int, drop_last: bool) -> int:
    """Samples of an epoch's order from ``base`` on, padded (or, with ``drop_last``, truncated) to a multiple
    of ``granule``."""
    rest = max(0, dataset_len - base)
    return (rest // granule if drop_last else -(-rest // granule)) * granule  # -(-a // b) == ceil(a / b)


class ResumableSampler(Sampler[int]):
    """Per-rank epoch order, a pure function of the constructor arguments and ``epoch``.

    Invariants (same arithmetic as ``torch.utils.data.DistributedSampler``):

    * the global order of epoch ``e`` is ``randperm(dataset_len)`` from a
      ``torch.Generator`` seeded with ``seed + e`` (``range`` when not shuffling);
    * ``base`` (default 0) leading samples of it are left out: they were
      consumed before a resize (see ``ResumableLoader``);
    * what remains, without ``drop_last``, is padded by repeating from the
      order's start to a multiple of ``granule`` (default ``num_replicas``);
      with ``drop_last`` it is truncated to one;
    * rank ``r`` takes ``rest[r::num_replicas]``; every rank gets exactly
      ``num_samples`` indices.

    With ``granule`` a global batch (a multiple of ``num_replicas``), global
    step ``s`` is ``rest[s*granule:(s+1)*granule]`` whatever ``num_replicas``
    is: the loader relies on this to keep each step's samples when the world
    size changes. ``epoch`` and ``start`` are plain fields set by the owner
    (the loader); iteration yields ``indices(epoch)[start:]``. Nothing here
    counts consumption. Uses only a private generator, never the global RNG.
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
        granule: int | None = None,
        base: int = 0,
    ) -> None:
        if num_replicas is None or rank is None:
            world, world_rank = default_world()
            num_replicas = world if num_replicas is None else num_replicas
            rank = world_rank if rank is None else rank
        granule = int(num_replicas) if granule is None else int(granule)
        if (int(dataset_len) < 0 or int(num_replicas) < 1 or not 0 <= int(rank) < int(num_replicas)
                or granule < 1 or granule % int(num_replicas) or int(base) < 0):
            raise ValueError(f"bad sampler: dataset_len={dataset_len}, num_replicas={num_replicas}, rank={rank}, "
                             f"granule={granule} (a multiple of num_replicas), base={base}")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.granule = granule
        self.base = int(base)
        self.epoch = 0
        self.start = 0
        #: Length of the remaining order after padding (or truncation): a multiple of ``granule``.
        self.total_size = padded_length(self.dataset_len, self.base, self.granule, self.drop_last)
        self.num_samples = self.total_size // self.num_replicas

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
            g.manual_seed((self.seed + int(epoch)) & MASK64)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        rest = order[self.base :]
        pad = self.total_size - len(rest)
        if pad > 0:
            # Repeat from the order's start (several times when n < granule), as DistributedSampler pads.
            rest += (order * (-(-pad // n)))[:pad]
        else:
            rest = rest[: self.total_size]
        return rest[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
