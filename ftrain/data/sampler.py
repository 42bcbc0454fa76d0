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


def _default_world() -> tuple[int, int]:
    """(world_size, rank) from torch.distributed if initialised, else env, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get(envvars.WORLD_SIZE, "1")), int(os.environ.get(envvars.RANK, "0"))


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
            g.manual_seed((self.seed + int(epoch)) & MASK64)
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
