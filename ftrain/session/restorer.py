"""Worker side: a restore, from wherever the bytes are, into the registered objects without touching them first.

Collective. The ranks learn what each disk and the remote tier hold (``sources.py``), and try steps newest
first (``checkpoint/assembly.py``): the step's manifest from its nearest copy; each disk brought the files its
ranks read but lacks (a peer's copy, then the remote tier's); then each rank reads and verifies its part from
its own disk (``reading.py``). A damaged copy of a file is set aside and the same step tried from its next
source; a step that no source can complete, or whose content is damaged in every copy, is skipped with one
warning (rank 0's) that says why. Nothing registered is written until every rank holds a verified checkpoint:
:class:`Restored` then does phase two of the load. Steps found damaged as a whole are then quarantined on each
disk by its leader (``damaged-step-N``, docs/FORMAT.md "Quarantine"), so that retention never counts them.

Not thread-safe; one per restore.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrain.checkpoint import assembly, checksum, content, format, retention
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import read_shard_record, read_shard_tensors
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CorruptCheckpoint, IncompleteCheckpoints, StateMismatch
from ftrain.session import reading
from ftrain.session.collectives import Collectives
from ftrain.session.layout import Layout
from ftrain.session.reading import RankReader, Targets
from ftrain.session.sources import Sources

log = logging.getLogger("ftrain")


@dataclass
class Restored:
    """A checkpoint every rank verified: its trees decoded (fresh tensors filled; registered ones not yet)."""

    manifest: Manifest
    trees: dict[str, Any]
    reader: RankReader

    def finish(self) -> None:
        """Phase two of a load: read into the registered tensors themselves. Collective across nodes."""
        try:
            self.reader.fill(live=True)
        finally:
            self.reader.close()

    def abandon(self) -> None:
        self.reader.close()


@dataclass(frozen=True)
class _Unusable:
    """Why no copy of a step will do; ``damaged``: for its own content (the storage leaf's checks), so it is
    damaged wherever it is, not merely unfit for the objects registered now."""

    why: str
    damaged: bool


class Restorer:
    def __init__(self, layout: Layout, coll: Collectives, local: LocalStorage, store: CheckpointStore,
                 sources: Sources, single_node: bool) -> None:
        self.layout, self.coll, self.local, self.store, self.sources = layout, coll, local, store, sources
        self.rank, self.world_size = coll.rank, coll.world_size
        self.single_node = single_node
        #: The newest checkpoint one disk's loss cannot take (replicated, or remote), as found by :meth:`restore`.
        self.safe: int | None = None
        #: step -> (its manifest's digest, why): steps whose own content :meth:`restore` found damaged.
        self.damaged: dict[int, tuple[str, str]] = {}

    def restore(self, check: Callable[[Manifest, dict[str, Any] | None], None],
                candidates: Iterator[Manifest] | None = None, targets: Callable[[], Targets] | None = None,
                ) -> Restored | None:
        """The newest checkpoint every rank could read, verify and fit, decoded; None if there is none.

        The ranks learn what each disk and the remote tier hold and agree on the newest step that can be
        assembled from all of them together (``sources.py``, ``checkpoint/assembly.py``); a disk lacking files
        its ranks read fetches them (a peer's copy first, then the remote tier's). Then each rank, touching
        nothing registered:

        1. ``check(manifest, None)``: the manifest's layout fits this run;
        2. reads and verifies its shard records (the state trees) and calls
           ``check(manifest, trees)`` with every tensor still a
           :class:`~ftrain.session.validation.TensorSpec`: the state fits the
           registered objects, before any tensor byte is allocated;
        3. plans its reads (``reading.RankReader``: the tensors ``targets()`` offers, the registered ones, are read
           into in place) and verifies every block it is responsible for, filling fresh tensors on the way.

        After the ranks agree, fresh tensors are complete and the trees decoded; ``Restored.finish()`` reads
        into the registered tensors (phase two of a load: call it once phase one succeeded on every rank).

        A damaged copy of a file is set aside and the step is tried again from its next source; a step no
        source can complete, or whose content is damaged everywhere, falls back to the next older one. A
        mismatch (a checkpoint whose files verify, for another model) raises :class:`StateMismatch` on every
        rank. ``candidates`` (rank 0's matter): try only these steps, in this order (``load_best``). With
        nothing to restore but parts of checkpoints written to disks that are not in the job now, raises
        :class:`IncompleteCheckpoints` rather than start fresh over them.
        """
        holdings = self.sources.gather()
        self.safe = assembly.newest_safe(holdings, self.sources.order)
        pools: list[set[int] | None] = [None]
        if candidates is not None:
            ranked = [m.step for m in candidates] if self.rank == 0 else []
            pools = [{s} for s in json.loads(self.coll.broadcast_bytes(json.dumps(ranked).encode(), 0))]
        found: Restored | None = None
        for only in pools:
            found = self._restore_from(check, targets, only)
            if found is not None:
                break
        # Passed over newest first: with no pool, every step above the one restored was tried and refused.
        self._quarantine(found.manifest.step if found else None, passed_over=candidates is None)
        if found is not None:
            return found
        away = assembly.elsewhere(self.sources.holdings, self.layout.order) if candidates is None else []
        if away:
            raise IncompleteCheckpoints(
                f"no checkpoint can be assembled from the disks of this job and the remote tier, but parts of step(s) "
                f"{', '.join(map(str, away[-3:]))} were written to node-local disks that are not in the job now; "
                "refusing to start fresh over them (the node may come back). What each source holds:\n"
                f"{self.sources.describe()}\nTo start over on purpose, delete the step-* directories on every node "
                "(or point checkpoint.dir elsewhere)")
        return None

    def _restore_from(self, check: Callable[[Manifest, dict[str, Any] | None], None],
                      targets: Callable[[], Targets] | None, only: set[int] | None) -> Restored | None:
        src, order = self.sources, self.sources.order
        bad: dict[int, dict[tuple[str, str], str]] = {}  # step -> (source, file) -> what is wrong with that copy
        skip: dict[int, str] = {}  # step -> why no copy of it will do
        told: set[int] = set()
        while True:
            choice = assembly.choose(src.holdings, order, bad=bad, skip=skip, only=only)
            self._tell_skipped(choice.step if choice else None, only, bad, skip, told)
            if choice is None:
                return None
            step = choice.step
            spoilt = bad.setdefault(step, {})
            manifest_source = next(s for s in order if s in choice.manifests)
            try:
                manifest, raw, _ = src.manifest(choice)
                check(manifest, None)  # the same manifest on every rank, so the same verdict
            except CorruptCheckpoint as e:
                spoilt[(manifest_source, format.MANIFEST)] = f"{e.path}: {e.reason}"
                if not any(s != manifest_source for s in choice.manifests):
                    skip[step] = f"{e.path}: {e.reason}"
                continue
            readers = assembly.readers(choice, {r: format.shard_names(r)[1] for r in range(manifest.world_size)},
                                       self.layout.disks)
            offered = targets() if targets else {}
            try:
                plan = RankReader(manifest, self.local, self.coll, single_node=self.single_node, targets=offered,
                                  readers=readers, dry=True)
                moves = assembly.transfers(choice, src.needs(plan.files()), order, spoilt)
            except assembly.Unassemblable as e:
                skip[step] = str(e)
                continue
            for pair in src.materialize(choice, manifest, raw, moves):
                spoilt[pair] = "did not arrive intact"
            if any((t.src, t.file) in spoilt for t in moves):
                continue
            outcome = self._read_local(manifest, check, offered, readers)
            if isinstance(outcome, Restored):
                return outcome
            if isinstance(outcome, dict):  # damaged copies on these disks: set aside; the step again, from others
                src.damaged(step, outcome)
                spoilt.update(outcome)
            else:
                skip[step] = outcome.why
                if outcome.damaged:
                    self.damaged[step] = (choice.digest, outcome.why)

    def _tell_skipped(self, chosen: int | None, only: set[int] | None, bad: dict[int, dict[tuple[str, str], str]],
                      skip: dict[int, str], told: set[int]) -> None:
        """Rank 0: one warning per step newer than ``chosen`` (every step, if None) that cannot be restored."""
        if self.rank != 0:
            return
        holdings, order = self.sources.holdings, self.sources.order
        for step in sorted({s for steps in holdings.values() for s in steps}, reverse=True):
            if (chosen is not None and step <= chosen) or step in told or (only is not None and step not in only):
                continue
            told.add(step)
            why = skip.get(step) or "; ".join(
                f"{file}: " + ", ".join(reason if len(order) == 1 else f"{self.sources.label(s)}: {reason}"
                                        for s, reason in reasons)
                for file, reasons in assembly.gaps(holdings, step, order, bad.get(step, {})).items())
            log.warning("skipping checkpoint step %d: %s; falling back to an older one", step, why or "incomplete")

    def _read_local(self, manifest: Manifest, check: Callable[[Manifest, dict[str, Any] | None], None],
                    offered: Targets, readers: dict[int, int]) -> Restored | dict[tuple[str, str], str] | _Unusable:
        """Every rank reads and verifies what it restores of ``manifest`` from its own disk (collective): the
        decoded checkpoint; or the (disk, file) copies found damaged, with why; or why the step itself is
        unusable (its content is damaged whatever the copy, or does not fit what is registered)."""
        damage: CorruptCheckpoint | None = None
        own = False  # the damage is in the checkpoint's own content, whatever is registered
        mismatch: StateMismatch | None = None
        reader: RankReader | None = None
        records: dict[str, Any] = {}
        where = str(self.store.path(manifest.step))
        try:
            ranks = reading.sources(manifest, self.world_size, self.rank)
            records = content.read_trees(self.store.storage, manifest, ranks)
            try:
                trees = content.decode_trees(records, content.specs_of(manifest).__getitem__, where)
                content.check_trees(manifest, trees, where)  # what `ftrain ckpt verify` checks too
            except CorruptCheckpoint:
                own = True
                raise
            check(manifest, trees)
            reader = RankReader(manifest, self.local, self.coll, single_node=self.single_node, targets=offered,
                                readers=readers)
            reader.verify()
        except CorruptCheckpoint as e:
            damage = e
        except StateMismatch as e:
            mismatch = e
            try:  # a mismatch counts only in a checkpoint whose files verify; otherwise it is damage
                self._verify_files(manifest)
            except CorruptCheckpoint as e2:
                damage, mismatch = e2, None
        file = Path(damage.path).name if damage is not None else ""
        mine = [damage is not None, mismatch is not None, file if file in manifest.files else "",
                f"{damage.path}: {damage.reason}" if damage is not None else "", own]
        verdicts = [json.loads(b) for b in self.coll.all_gather_bytes(json.dumps(mine).encode())]
        if any(d or m for d, m, _, _, _ in verdicts):
            if reader is not None:
                reader.close()
            if not any(d for d, _, _, _, _ in verdicts):
                raise mismatch or StateMismatch(f"checkpoint step {manifest.step} does not fit the registered "
                                                "state on another rank; see its log")
            if all(f for d, _, f, _, _ in verdicts if d):  # every damage is in one copy of a file: try another
                return {(self.layout.disks[r], f): why for r, (d, _, f, why, _) in enumerate(verdicts) if d}
            whole = [(why, o) for d, _, f, why, o in verdicts if d and not f]
            return _Unusable(whole[0][0], any(o for _, o in whole))
        assert reader is not None
        try:
            reader.fill(live=False)  # fresh tensors: what phase one of the load (with its undo) needs
        except BaseException:
            reader.close()
            raise
        return Restored(manifest, content.decode_trees(records, reader.values(), where), reader)

    def _quarantine(self, restored: int | None, *, passed_over: bool) -> None:
        """Each disk's leader, once the ranks agreed: set aside (``damaged-step-N``) this disk's copy of every step
        whose own content proved damaged, and, when restore went newest first (``passed_over``), of every step
        above the one restored (every step, if none was) that is damaged as a whole on this disk: a manifest that
        does not parse, or a copy of a checkpoint saved into this one directory that lacks a file or holds one
        of the wrong size (a copy set aside as ``.damaged`` above included). A part of a checkpoint saved to
        several disks is never set aside for what it lacks: the rest is elsewhere."""
        if not self.layout.is_leader:
            return
        store = self.store
        for step in store.steps():
            why = ""
            if step in self.damaged:
                try:
                    same = checksum.digest(store.read_manifest_raw(step)[1]) == self.damaged[step][0]
                except CorruptCheckpoint:
                    same = False
                why = self.damaged[step][1] if same else ""
            if not why and passed_over and (restored is None or step > restored):
                verdict = store.assess(step)
                why = verdict.reason if verdict.damaged else ""
            if why:
                retention.quarantine(store, step, f"restore: {why}")

    def _verify_files(self, manifest: Manifest) -> None:
        """Checksum this rank's own shard file (or shard 0's after a resize) without keeping any tensor."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        rank = self.rank if manifest.world_size == self.world_size else 0
        read_shard_record(storage, ckpt, manifest, rank)
        read_shard_tensors(storage, ckpt, manifest, rank, keep=lambda n: False)
