"""Worker side: which ranks write into which directory, found out at every start (docs/FORMAT.md, "Disks").

Each rank reads its checkpoint root's disk id (``checkpoint/disks.py``) and the ranks exchange them. Ranks
with the same id share a directory: all of them on a shared filesystem or on one node, one group per node
with node-local disks. The lowest rank of each group is its disk's *leader*: it commits that disk's part of
each checkpoint, cleans it, holds its lease, uploads its files and sends and receives its replicas.
"""
from __future__ import annotations

from dataclasses import dataclass

from ftrain.checkpoint import assembly


@dataclass(frozen=True)
class Layout:
    """The disk of every rank, and this rank. Pure; the same on every rank."""

    rank: int
    #: The disk id of each rank's root, by rank.
    disks: tuple[str, ...]

    @property
    def world_size(self) -> int:
        return len(self.disks)

    @property
    def order(self) -> tuple[str, ...]:
        """The distinct disks, ordered by their lowest rank (rank 0's first)."""
        return tuple(dict.fromkeys(self.disks))

    @property
    def my_disk(self) -> str:
        return self.disks[self.rank]

    @property
    def shared(self) -> bool:
        """One directory for every rank (one node, or a shared filesystem)."""
        return len(self.order) == 1

    def ranks_on(self, disk: str) -> tuple[int, ...]:
        return tuple(r for r, d in enumerate(self.disks) if d == disk)

    def leader(self, disk: str) -> int:
        return self.disks.index(disk)

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(self.leader(d) for d in self.order)

    @property
    def is_leader(self) -> bool:
        return self.leader(self.my_disk) == self.rank

    def describe(self, disk: str) -> str:
        """A disk for messages: its id's first digits and the ranks writing to it now."""
        ranks = self.ranks_on(disk)
        if not ranks:
            return f"disk {disk[:8]}"
        return f"disk {disk[:8]} ({'rank' if len(ranks) == 1 else 'ranks'} {assembly.ranges(ranks)})"
