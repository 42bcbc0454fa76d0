"""Worker side: a restore, from wherever the bytes are, into the registered objects without touching them first.

Collective. The ranks learn what each disk and the remote tier hold (``sources.py``), and try steps newest
first (``checkpoint/assembly.py``): the step's manifest from its nearest copy; each disk brought the files its
ranks read but lacks (a peer's copy, then the remote tier's); then each rank reads and verifies its part from
its own disk (``reading.py``). A damaged copy of a file is set aside and the same step tried from its next
source; a step that no source can complete, or whose content is damaged in every copy, is skipped with one
warning (rank 0's) that says why. Nothing registered is written until every rank holds a verified checkpoint:
:class:`Restored` then does phase two of the load.

Not thread-safe; one per restore.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrain.checkpoint import assembly, codec, format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import read_shard_record, read_shard_tensors
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CheckpointError, CorruptCheckpoint, IncompleteCheckpoints, StateMismatch
from ftrain.session.collectives import Collectives
from ftrain.session.layout import Layout
from ftrain.session.reading import RankReader, Targets, specs_of
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


class Restorer:
    def __init__(self, layout: Layout, coll: Collectives, local: LocalStorage, store: CheckpointStore,
                 sources: Sources, single_node: bool) -> None:
        self.layout, self.coll, self.local, self.store, self.sources = layout, coll, local, store, sources
        self.rank, self.world_size = coll.rank, coll.world_size
        self.single_node = single_node
        #: The newest checkpoint one disk's loss cannot take (replicated, or remote), as found by :meth:`restore`.
        self.safe: int | None = None

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
        for only in pools:
            found = self._restore_from(check, targets, only)
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
                skip[step] = outcome

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
                    offered: Targets, readers: dict[int, int]) -> Restored | dict[tuple[str, str], str] | str:
        """Every rank reads and verifies what it restores of ``manifest`` from its own disk (collective): the
        decoded checkpoint; or the (disk, file) copies found damaged, with why; or why the step itself is
        unusable (its content is damaged whatever the copy)."""
        damage: CorruptCheckpoint | None = None
        mismatch: StateMismatch | None = None
        reader: RankReader | None = None
        records: dict[str, Any] = {}
        try:
            records = self._read_records(manifest)
            check(manifest, self._decode(manifest, records, specs_of(manifest).__getitem__))
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
                f"{damage.path}: {damage.reason}" if damage is not None else ""]
        verdicts = [json.loads(b) for b in self.coll.all_gather_bytes(json.dumps(mine).encode())]
        if any(d or m for d, m, _, _ in verdicts):
            if reader is not None:
                reader.close()
            if not any(d for d, _, _, _ in verdicts):
                raise mismatch or StateMismatch(f"checkpoint step {manifest.step} does not fit the registered "
                                                "state on another rank; see its log")
            if all(f for d, _, f, _ in verdicts if d):  # every damage is in one copy of a file: try another
                return {(self.layout.disks[r], f): why for r, (d, _, f, why) in enumerate(verdicts) if d}
            return next(why for d, _, f, why in verdicts if d and not f)
        assert reader is not None
        try:
            reader.fill(live=False)  # fresh tensors: what phase one of the load (with its undo) needs
        except BaseException:
            reader.close()
            raise
        return Restored(manifest, self._decode(manifest, records, reader.values()), reader)

    def _read_records(self, manifest: Manifest) -> dict[str, Any]:
        """The replicated tree and the per-rank trees of the saving ranks this rank takes over, from the verified
        shard records."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        record0 = read_shard_record(storage, ckpt, manifest, 0)
        trees = {REPLICATED: record0.trees.get(REPLICATED)}
        sources = range(manifest.world_size) if manifest.world_size != self.world_size else [self.rank]
        for r in sources:
            record = record0 if r == 0 else read_shard_record(storage, ckpt, manifest, r)
            trees[rank_key(r)] = record.trees.get(rank_key(r))
        for key, tree in trees.items():
            if tree is None:
                owner = 0 if key == REPLICATED else int(key.rsplit("-", 1)[-1])
                raise CorruptCheckpoint(storage.describe(f"{ckpt}/{format.shard_names(owner)[0]}"),
                                        f"state tree {key!r} missing")
        return trees

    def _decode(self, manifest: Manifest, records: dict[str, Any], lookup: Callable[[str], Any]) -> dict[str, Any]:
        try:
            # Per object, as encoded: an alias decodes to the very tensor (or TensorSpec) it names.
            return {key: codec.decode_objects(tree, lookup) for key, tree in records.items()}
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise CorruptCheckpoint(str(self.store.path(manifest.step)),
                                    f"malformed state tree ({type(e).__name__}: {e})") from None

    def _verify_files(self, manifest: Manifest) -> None:
        """Checksum this rank's own shard file (or shard 0's after a resize) without keeping any tensor."""
        storage, ckpt = self.store.storage, format.step_dirname(manifest.step)
        rank = self.rank if manifest.world_size == self.world_size else 0
        read_shard_record(storage, ckpt, manifest, rank)
        read_shard_tensors(storage, ckpt, manifest, rank, keep=lambda n: False)
