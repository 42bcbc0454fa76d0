"""Worker side and tools: logs of the samples each optimizer step consumed, and the exactly-once audit over them.

A training script writes one line per optimizer step and rank (``step``, then
the sample indices that rank consumed in it) with :class:`SampleLog`. Each
process group of the job (every start, restart, or resize) writes its own
files, ``<group>.w<world>.rank<r>.txt``, where ``<group>`` is agreed by the
ranks (rank 0's clock at start, zero-padded, so names sort in time order).

:func:`history` rebuilds the history that counts: steps recomputed after a
rollback replace the earlier ones (the newest group that logged a step wins,
and must have logged it on all its ranks). :func:`audit` compares it with an
uninterrupted run's: the same samples at every global step, and (for a
dataset that fills whole global batches) every sample exactly once per epoch.
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_NAME = re.compile(r"^(\d{20})\.w(\d+)\.rank(\d+)\.txt$")


class SampleLog:
    """One rank's log for this process group; ``group`` must be the same on every rank (see :func:`group_id`)."""

    def __init__(self, directory: str | os.PathLike[str], group: str, world_size: int, rank: int) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path / f"{group}.w{world_size}.rank{rank}.txt", "a", buffering=1)  # noqa: SIM115

    def write(self, step: int, indices: list[int]) -> None:
        self._file.write(f"{step} {' '.join(map(str, indices))}\n")

    def close(self) -> None:
        self._file.close()


def group_id() -> str:
    """A name for this process group, the same on every rank: rank 0's wall clock in ns (collective when
    torch.distributed is initialised: every rank must call it)."""
    import torch
    import torch.distributed as dist

    stamp = torch.tensor([time.time_ns()], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(stamp, 0)
    return f"{int(stamp.item()):020d}"


@dataclass
class Group:
    name: str
    world_size: int
    #: rank -> step -> indices (a step written twice by one rank keeps the last line)
    steps: dict[int, dict[int, list[int]]] = field(default_factory=dict)


def read(directory: str | os.PathLike[str]) -> list[Group]:
    """Every group's logs under ``directory``, oldest first."""
    groups: dict[str, Group] = {}
    for path in sorted(Path(directory).iterdir()):
        m = _NAME.match(path.name)
        if not m:
            continue
        g = groups.setdefault(m[1], Group(m[1], int(m[2])))
        per_step = g.steps.setdefault(int(m[3]), {})
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            step, *idx = map(int, line.split())
            per_step[step] = idx
    return [groups[k] for k in sorted(groups)]


def history(directory: str | os.PathLike[str]) -> dict[int, list[int]]:
    """step -> the sorted samples it consumed over all ranks, in the history that counts.

    The newest group that logged a step replaces every earlier one's (it
    recomputed it after a rollback); it must have logged it on every one of its
    ranks, else AssertionError names the step and the group.
    """
    out: dict[int, list[int]] = {}
    for g in read(directory):
        steps = {s for per_rank in g.steps.values() for s in per_rank}
        for s in steps:
            missing = [r for r in range(g.world_size) if s not in g.steps.get(r, {})]
            if missing:
                if any(s < t for per_rank in g.steps.values() for t in per_rank):
                    raise AssertionError(f"group {g.name} (world {g.world_size}) logged step {s} on some ranks only "
                                         f"(missing: {missing}) and went on past it")
                continue  # the group's last step, cut short by a kill: a later group recomputes it
            out[s] = sorted(i for r in range(g.world_size) for i in g.steps[r][s])
    return out


def audit(got: dict[int, list[int]], ref: dict[int, list[int]], steps_per_epoch: int | None = None,
          dataset_len: int | None = None) -> list[str]:
    """Problems of ``got`` (a :func:`history`) against an uninterrupted run's; empty when exactly-once holds.

    Every step of ``ref`` must hold the same samples in ``got``; with
    ``steps_per_epoch`` and ``dataset_len`` every epoch must consume each sample
    exactly once.
    """
    problems = []
    if sorted(got) != sorted(ref):
        problems.append(f"steps differ: missing {sorted(set(ref) - set(got))[:10]}, "
                        f"extra {sorted(set(got) - set(ref))[:10]}")
    for s in sorted(set(got) & set(ref)):
        if got[s] != ref[s]:
            problems.append(f"step {s} consumed other samples than the uninterrupted run's "
                            f"(+{sorted(Counter(got[s]) - Counter(ref[s]))[:5]}, "
                            f"-{sorted(Counter(ref[s]) - Counter(got[s]))[:5]})")
    if steps_per_epoch and dataset_len:
        for e in range(max(got, default=0) // steps_per_epoch):
            seen = Counter(i for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1)
                           for i in got.get(s, []))
            if sorted(seen) != list(range(dataset_len)) or set(seen.values()) != {1}:
                twice = sorted(i for i, c in seen.items() if c > 1)[:5]
                never = sorted(set(range(dataset_len)) - set(seen))[:5]
                problems.append(f"epoch {e}: samples seen twice {twice}, never {never}")
    return problems
