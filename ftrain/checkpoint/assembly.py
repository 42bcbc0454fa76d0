"""Where a checkpoint's bytes are, and how to bring each rank the ones it reads: pure planning, no I/O.

A job's ranks write into one directory or into several node-local ones (docs/FORMAT.md, "Disks"); copies of
shard files may also be on peers' disks (replicas) and on the remote tier. A *source* is a disk (its id) or
:data:`REMOTE`. On restore every disk's leader lists what it holds (:class:`Held`, per step), rank 0 adds the
remote tier's steps, and every rank runs the same functions here on the same input:

1. :func:`choose`: the newest step that can be assembled completely from all sources together, skipping files
   found damaged (``bad``), and the sources of each of its files, nearest first;
2. :func:`readers`: which rank reads (and, across nodes, broadcasts) each saver's replicated tensors: one
   whose disk already holds that saver's file, so nothing moves that need not;
3. :func:`transfers`: the files each disk lacks of what its ranks will read, and where each comes from: its
   own disk first, then a peer's, then the remote tier.

Also :func:`replica_rounds` (which disk copies its files to which after a save) and :func:`describe` (what each
source holds, for the message when nothing can be assembled).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ftrain.checkpoint.format import MANIFEST

#: The remote tier as a source (a disk id is hex, so it cannot be this).
REMOTE = "remote"

_SHARD = re.compile(r"^shard-(\d{5})\.(json|bin)$")


@dataclass(frozen=True)
class Held:
    """What one source holds of one step: its manifest's identity, the files it lists, and those present."""

    #: The manifest body's checksum: the same step saved twice (e.g. by two runs) is two different checkpoints.
    digest: str
    #: The shard files the manifest lists.
    listed: frozenset[str]
    #: The listed files present here with their listed sizes (the manifest itself is implied: it was read).
    have: frozenset[str]
    #: The disks the manifest's placement names (where the saving ranks wrote; empty before format 4).
    placed: frozenset[str] = frozenset()
    #: Why listed files this source should hold are not in ``have`` (file -> reason), for messages.
    problems: Mapping[str, str] = field(default_factory=dict)


#: source -> step -> what it holds.
Holdings = Mapping[str, Mapping[int, Held]]


@dataclass(frozen=True)
class Choice:
    """A step every file of which some source holds, and those sources per file, nearest first per disk."""

    step: int
    digest: str
    listed: frozenset[str]
    #: file -> the sources holding an intact-looking copy (not known bad), in source order.
    holders: Mapping[str, tuple[str, ...]]
    #: The sources holding this step's manifest, in source order.
    manifests: tuple[str, ...]


@dataclass(frozen=True)
class Transfer:
    """Copy ``file`` of the chosen step from source ``src`` to disk ``dst``."""

    file: str
    src: str
    dst: str


class Unassemblable(Exception):
    """No source holds an intact copy of a file a rank needs."""

    def __init__(self, file: str, dst: str) -> None:
        super().__init__(f"no source holds an intact copy of {file} (needed on disk {dst})")
        self.file, self.dst = file, dst


def rank_of(name: str) -> int | None:
    """The saving rank of shard file ``name`` (None for any other name)."""
    m = _SHARD.match(name)
    return int(m.group(1)) if m else None


def choose(holdings: Holdings, sources: Sequence[str], *, bad: Mapping[int, Collection[tuple[str, str]]] | None = None,
           skip: Collection[int] = (), only: Collection[int] | None = None) -> Choice | None:
    """The newest step (among ``only``, if given; never one in ``skip``) whose every listed file some source in
    ``sources`` holds and is not known bad (``bad[step]``: its ``(source, file)`` copies known damaged or
    missing); None if there is none.

    Sources holding the same step with different manifests (a step saved twice) are different checkpoints: the
    one with the most holders is tried first (then by digest, so every rank picks the same).
    """
    steps = sorted({s for src in sources for s in holdings.get(src, {})}, reverse=True)
    for step in steps:
        if step in skip or (only is not None and step not in only):
            continue
        spoilt = (bad or {}).get(step, ())
        by_digest: dict[str, list[str]] = {}
        for src in sources:
            held = holdings.get(src, {}).get(step)
            if held is not None:
                by_digest.setdefault(held.digest, []).append(src)
        for digest, srcs in sorted(by_digest.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            manifests = tuple(s for s in srcs if (s, MANIFEST) not in spoilt)
            listed = holdings[srcs[0]][step].listed
            holders = {f: tuple(s for s in srcs if f in holdings[s][step].have and (s, f) not in spoilt)
                       for f in sorted(listed)}
            if manifests and all(holders.values()):
                return Choice(step, digest, listed, holders, manifests)
    return None


def gaps(holdings: Holdings, step: int, sources: Sequence[str], bad: Mapping[tuple[str, str], str]
         ) -> dict[str, list[tuple[str, str]]]:
    """Why ``step`` cannot be assembled: file -> (source, reason) for each source holding the step but no good
    copy of that file (``bad``: (source, file) -> what was wrong with that copy), for the files no source holds
    intact."""
    held = {src: h for src in sources if (h := holdings.get(src, {}).get(step)) is not None}
    if not held:
        return {}
    listed = next(iter(held.values())).listed
    out: dict[str, list[tuple[str, str]]] = {}
    for f in sorted(listed):
        if any(f in h.have and (src, f) not in bad for src, h in held.items()):
            continue
        out[f] = [(src, bad.get((src, f)) or h.problems.get(f) or "not held") for src, h in held.items()]
    return out


def readers(choice: Choice, saver_files: Mapping[int, str], rank_disks: Sequence[str]) -> dict[int, int]:
    """saver -> the rank that reads that saver's replicated tensors (``saver_files``: saver -> its .bin).

    The default is ``saver mod W`` (the saver itself at the same world size); if that rank's disk lacks the
    file but another rank's disk has it, the lowest such rank reads instead, so no bytes move for it."""
    world = len(rank_disks)
    out = {}
    for saver, file in saver_files.items():
        holders = set(choice.holders.get(file, ()))
        default = saver % world
        if rank_disks[default] in holders:
            out[saver] = default
        else:
            out[saver] = next((r for r, d in enumerate(rank_disks) if d in holders), default)
    return out


def transfers(choice: Choice, needs: Mapping[str, Iterable[str]], order: Sequence[str],
              bad: Collection[tuple[str, str]] = ()) -> list[Transfer]:
    """What each disk must receive so that it holds every file in ``needs[disk]`` and the step's manifest.

    A file comes from the first source in ``order`` (the disks in their agreed order, then the remote tier)
    that holds it and is not ``bad``, the disk itself being no transfer at all. Raises :class:`Unassemblable`
    if some needed file has no source. Deterministic: every rank computes the same list.
    """
    out: list[Transfer] = []
    for dst in order:
        if dst not in needs:
            continue
        wanted = sorted(set(needs[dst]))
        if dst not in choice.manifests:
            src = next((s for s in order if s in choice.manifests), choice.manifests[0])
            out.append(Transfer(MANIFEST, src, dst))
        for f in wanted:
            holders = choice.holders.get(f)
            if holders is None:
                raise Unassemblable(f, dst)
            if dst in holders and (dst, f) not in bad:
                continue
            origin = next((s for s in order if s in holders and s != dst and (s, f) not in bad), None)
            if origin is None:
                raise Unassemblable(f, dst)
            out.append(Transfer(f, origin, dst))
    return out


def elsewhere(holdings: Holdings, present: Collection[str]) -> list[int]:
    """Steps the sources hold only part of whose other files were written to disks not ``present`` (a node
    that has not come back): starting fresh over them would throw away a checkpoint that may yet return."""
    out = []
    for step in sorted({s for steps in holdings.values() for s in steps}):
        held = [h for steps in holdings.values() if (h := steps.get(step)) is not None]
        have = frozenset().union(*(h.have for h in held))
        placed = frozenset().union(*(h.placed for h in held))
        if have != held[0].listed and placed - set(present):
            out.append(step)
    return out


def newest_safe(holdings: Holdings, sources: Sequence[str]) -> int | None:
    """The newest step whose every file is held by at least two sources (the remote tier counting as one): one
    disk's loss cannot take it."""
    steps = sorted({s for src in sources for s in holdings.get(src, {})}, reverse=True)
    for step in steps:
        held = [(src, holdings[src][step]) for src in sources if step in holdings.get(src, {})]
        by_digest: dict[str, list[Held]] = {}
        for _, h in held:
            by_digest.setdefault(h.digest, []).append(h)
        for hs in by_digest.values():
            if all(sum(f in h.have for h in hs) >= 2 for f in hs[0].listed):
                return step
    return None


def replica_rounds(disks: Sequence[str], replicas: int) -> list[list[tuple[str, str]]]:
    """Round k (1..replicas) copies every disk's own files to the disk k places after it in ``disks``: each
    disk's files end up on ``replicas`` others, none of them on the same disk twice, so losing any one disk (or
    any ``replicas`` disks) leaves a copy of everything. Capped at ``len(disks) - 1`` rounds."""
    n = len(disks)
    return [[(disks[i], disks[(i + k) % n]) for i in range(n)] for k in range(1, min(replicas, n - 1) + 1)]


def describe(holdings: Holdings, sources: Sequence[str], names: Mapping[str, str] | None = None) -> str:
    """One line per source: the steps it holds and which saving ranks' files of each (for a refusal message)."""
    names = names or {}
    lines = []
    for src in sources:
        steps = holdings.get(src, {})
        label = names.get(src, "the remote tier" if src == REMOTE else f"disk {src[:8]}")
        if not steps:
            lines.append(f"{label}: nothing")
            continue
        parts = []
        for step in sorted(steps, reverse=True)[:5]:
            held = steps[step]
            ranks = sorted({r for f in held.have if (r := rank_of(f)) is not None})
            total = len({r for f in held.listed if (r := rank_of(f)) is not None})
            parts.append(f"step {step}: ranks {ranges(ranks) or 'none'} of {total}")
        more = f" (+{len(steps) - 5} older)" if len(steps) > 5 else ""
        lines.append(f"{label}: {'; '.join(parts)}{more}")
    return "\n".join(lines)


def ranges(ranks: Sequence[int]) -> str:
    out: list[str] = []
    for r in ranks:
        if out and r == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ",".join(out)
