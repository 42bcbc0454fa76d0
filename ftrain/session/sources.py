"""Worker side of a restore from wherever the bytes are: this disk, a peer's disk, or the remote tier.

Collective. The ranks learn what every disk and the remote tier hold (:meth:`Sources.gather`), agree on a
step's manifest (:meth:`Sources.manifest`), and bring every disk the files its ranks will read but it lacks
(:meth:`Sources.materialize`): from the disk itself first, then a peer's disk (``peers.py``), then the remote
tier, each file verified against the manifest before it is renamed in. The plan is pure and the same on every
rank (``checkpoint/assembly.py``); the restore then reads local files only, as always (``checkpointer.py``).

Fetched files land in ``.tmp-fetch-step-N-<nonce>/`` on the receiving disk (garbage if the restore is killed),
then move into ``step-N/`` (made from the manifest if the disk had no part of the step). A damaged local file
is renamed ``<name>.damaged`` inside its step directory, so a good copy can take its place.

Not thread-safe: the training thread, at restore.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import replace
from typing import Any

from ftrain.checkpoint import assembly, checksum, format
from ftrain.checkpoint.assembly import REMOTE, Choice, Held, Holdings, Transfer
from ftrain.checkpoint.download import download_files
from ftrain.checkpoint.manifest import Manifest, parse
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CorruptCheckpoint
from ftrain.session.collectives import Collectives
from ftrain.session.layout import Layout
from ftrain.session.peers import FileMove, Peers
from ftrain.session.tiers import RemoteTier

log = logging.getLogger("ftrain")

#: (source, file): a copy known to be damaged or missing.
Bad = set[tuple[str, str]]


class Sources:
    def __init__(self, layout: Layout, coll: Collectives, store: CheckpointStore, local: LocalStorage,
                 tier: RemoteTier | None, peers: Peers | None, nonce: str) -> None:
        """``store``: this rank's checkpoint root, on ``local``."""
        self.layout, self.coll, self.store, self.local, self.tier, self.peers, self.nonce = (
            layout, coll, store, local, tier, peers, nonce)
        self.holdings: dict[str, dict[int, Held]] = {}

    @property
    def order(self) -> list[str]:
        """Sources nearest first for rank 0's disk: the disks in the job's order, then the remote tier."""
        return [*self.layout.order, *([REMOTE] if self.tier is not None else [])]

    # ---------------------------------------------------------------- holdings
    def gather(self) -> Holdings:
        """Collective: what each disk (its leader looks) and the remote tier (rank 0 looks) hold, on every rank."""
        mine: dict[str, object] = {}
        if self.layout.is_leader:
            mine["disk"] = {str(step): _held_json(h) for step, h in self._scan().items()}
        if self.layout.rank == 0 and self.tier is not None:
            mine["remote"] = {str(step): _held_json(h) for step, h in self.tier.holdings().items()}
        self.holdings = {}
        for rank, raw in enumerate(self.coll.all_gather_bytes(json.dumps(mine).encode())):
            doc = json.loads(raw)
            if "disk" in doc:
                self.holdings[self.layout.disks[rank]] = {int(s): _held(h) for s, h in doc["disk"].items()}
            if "remote" in doc:
                self.holdings[REMOTE] = {int(s): _held(h) for s, h in doc["remote"].items()}
        return self.holdings

    def _scan(self) -> dict[int, Held]:
        out = {}
        for step in self.store.odd_steps():
            log.warning("ignoring %s: not a plain directory (ftrain never follows links in a checkpoint root)",
                        self.store.path(step))
        for step in self.store.steps():
            try:
                m, raw, have, problems = self.store.held(step)
            except CorruptCheckpoint as e:
                log.warning("skipping this disk's copy of checkpoint step %d: %s: %s", step, e.path, e.reason)
                continue
            except OSError as e:
                log.warning("skipping this disk's copy of checkpoint step %d: %s", step, e)
                continue
            out[step] = Held(_digest(raw), frozenset(m.files), frozenset(have), frozenset(m.placement), problems)
        return out

    def describe(self) -> str:
        names = {d: self.layout.describe(d) for d in self.layout.order}
        return assembly.describe(self.holdings, self.order, names)

    # ---------------------------------------------------------------- manifest
    def manifest(self, choice: Choice) -> tuple[Manifest, bytes, str]:
        """Collective: the chosen step's manifest, read by the nearest source holding it and sent to every rank;
        (manifest, its bytes, that source). CorruptCheckpoint on every rank if that copy is damaged."""
        src = next(s for s in self.order if s in choice.manifests)
        reader = 0 if src == REMOTE else self.layout.leader(src)
        sent: bytes | None = None
        if self.layout.rank == reader:  # b"M" and the manifest's bytes, or b"E" and why they could not be read
            try:
                sent = b"M" + self._read_manifest(src, choice.step)
            except (CorruptCheckpoint, OSError) as e:
                sent = b"E" + str(e).encode()[:4096]
        got = self.coll.broadcast_bytes(sent, reader)
        where = f"{self.label(src)}: {format.step_dirname(choice.step)}/{format.MANIFEST}"
        kind, raw = got[:1], got[1:]
        if kind != b"M":
            raise CorruptCheckpoint(where, raw.decode(errors="replace") or "unreadable")
        m = parse(raw, where)
        if _digest(raw) != choice.digest or m.step != choice.step:
            raise CorruptCheckpoint(where, "changed since it was listed")
        return m, raw, src

    def _read_manifest(self, src: str, step: int) -> bytes:
        rel = f"{format.step_dirname(step)}/{format.MANIFEST}"
        if src == REMOTE:
            assert self.tier is not None
            return self.tier.remote.storage.read(rel, format.MAX_MANIFEST_BYTES)
        return self.store.storage.read(rel, format.MAX_MANIFEST_BYTES)

    def label(self, src: str) -> str:
        if src == REMOTE and self.tier is not None:
            return self.tier.remote.storage.describe()
        return self.layout.describe(src) if src != REMOTE else "the remote tier"

    # ----------------------------------------------------------- materialize
    def needs(self, files: Iterable[str]) -> dict[str, set[str]]:
        """Collective: disk -> every file one of its ranks reads (``files``: this rank's)."""
        out: dict[str, set[str]] = {d: set() for d in self.layout.order}
        for rank, raw in enumerate(self.coll.all_gather_bytes(json.dumps(sorted(files)).encode())):
            out[self.layout.disks[rank]] |= set(json.loads(raw))
        return out

    def materialize(self, choice: Choice, m: Manifest, raw: bytes, moves: list[Transfer]) -> Bad:
        """Collective: carry out ``moves``; returns the (source, file) copies that proved damaged or missing (the
        same on every rank; logged where seen). Each disk's received files are in its ``step-N/`` afterwards."""
        if not moves:
            return set()
        t0 = time.monotonic()
        me = self.layout.my_disk
        ckpt = format.step_dirname(m.step)
        staging = f"{format.TMP_PREFIX}fetch-{ckpt}-{self.nonce}"
        mine = [t for t in moves if t.dst == me and t.file != format.MANIFEST]
        if self.layout.is_leader and any(t.dst == me for t in moves):
            self.local.makedir(staging)
        self.coll.barrier()  # every staging directory exists
        failed: Bad = set()
        failed |= self._from_peers(m, moves, staging)
        failed |= self._from_remote(m, [t for t in mine if t.src == REMOTE], staging)
        agreed: Bad = set()
        for raw_failed in self.coll.all_gather_bytes(json.dumps(sorted(failed)).encode()):
            agreed |= {(s, f) for s, f in json.loads(raw_failed)}
        if self.layout.is_leader and any(t.dst == me for t in moves):
            got = [t.file for t in mine if (t.src, t.file) not in agreed]
            self._settle(m, raw, staging, got, need_dir=any(t.file == format.MANIFEST for t in moves if t.dst == me))
        self.coll.barrier()  # every disk's files are in place
        for t in moves:  # the same bookkeeping on every rank: the holdings now include what arrived
            if (t.src, t.file) not in agreed and t.file != format.MANIFEST:
                self._add(t.dst, choice, t.file)
        fetched = [t for t in moves if t.file != format.MANIFEST and t.dst == me]
        if fetched and self.layout.is_leader:
            log.info("fetched %d file(s) of checkpoint step %d from %s in %.2fs", len(fetched), m.step,
                     ", ".join(sorted({self.label(t.src) for t in fetched})), time.monotonic() - t0)
        return agreed

    def _from_peers(self, m: Manifest, moves: list[Transfer], staging: str) -> Bad:
        """Peer-to-peer moves, in the agreed order: each leader sends or receives its own (or nothing)."""
        failed: Bad = set()
        if not self.layout.is_leader:
            return failed
        me = self.layout.my_disk
        ckpt = format.step_dirname(m.step)
        for t in moves:
            if t.src in (REMOTE, t.dst) or t.file == format.MANIFEST or me not in (t.src, t.dst):
                continue
            assert self.peers is not None
            entry = m.files[t.file]
            if t.src == me:
                self.peers.swap(self.local, send=[FileMove(f"{ckpt}/{t.file}", entry)], to=self.layout.leader(t.dst))
            else:
                lost = self.peers.swap(self.local, receive=[FileMove(f"{staging}/{t.file}", entry)],
                                       source=self.layout.leader(t.src))
                if lost:
                    failed.add((t.src, t.file))
        return failed

    def _from_remote(self, m: Manifest, moves: list[Transfer], staging: str) -> Bad:
        """This disk's downloads, shared among its ranks (they write into the same directory)."""
        failed: Bad = set()
        if not moves:
            return failed
        assert self.tier is not None
        ranks = self.layout.ranks_on(self.layout.my_disk)
        share = [t for i, t in enumerate(moves) if ranks[i % len(ranks)] == self.layout.rank]
        for t in share:
            try:
                download_files(self.tier.remote.storage, self.local, m, [t.file], staging)  # type: ignore[arg-type]
            except (CorruptCheckpoint, OSError) as e:
                log.warning("the remote tier's copy of %s of step %d is not usable: %s", t.file, m.step, e)
                self.local.delete(f"{staging}/{t.file}")
                failed.add((REMOTE, t.file))
        return failed

    def _settle(self, m: Manifest, raw: bytes, staging: str, got: list[str], *, need_dir: bool) -> None:
        """Leader: move the verified files into ``step-N/`` (the staging directory becomes it, with the manifest,
        if this disk had no part of the step)."""
        local = self.local
        final = format.step_dirname(m.step)
        if need_dir and not local.is_dir(final):
            local.write(f"{staging}/{format.MANIFEST}", raw)
            local.commit(staging, final)
            return
        for name in got:
            local.full(f"{staging}/{name}").replace(local.full(f"{final}/{name}"))
        local.fsync(final)
        local.delete(staging)

    def _add(self, disk: str, choice: Choice, name: str) -> None:
        steps = self.holdings.setdefault(disk, {})
        held = steps.get(choice.step)
        if held is None or held.digest != choice.digest:
            held = Held(choice.digest, choice.listed, frozenset())
        steps[choice.step] = replace(held, have=held.have | {name})

    # ------------------------------------------------------------------ damage
    def damaged(self, step: int, names: Collection[tuple[str, str]]) -> None:
        """Every rank: forget the (disk, file) copies found damaged while reading; each disk's leader renames its
        damaged files aside, so a good copy can be fetched in their place."""
        for disk, name in names:
            held = self.holdings.get(disk, {}).get(step)
            if held is not None:
                self.holdings[disk][step] = replace(held, have=held.have - {name})
            if disk == self.layout.my_disk and self.layout.is_leader:
                rel = f"{format.step_dirname(step)}/{name}"
                try:
                    self.local.full(rel).replace(self.local.full(rel + format.DAMAGED_SUFFIX))
                    log.warning("moved the damaged %s aside (%s)", self.local.full(rel), format.DAMAGED_SUFFIX)
                except OSError:
                    pass

    def agree_damage(self, found: tuple[str, str] | None) -> set[tuple[str, str]]:
        """Collective: every rank's damaged (disk, file), on every rank."""
        out: set[tuple[str, str]] = set()
        for raw in self.coll.all_gather_bytes(json.dumps(list(found) if found else []).encode()):
            pair = json.loads(raw)
            if pair:
                out.add((pair[0], pair[1]))
        return out


def _digest(raw: bytes) -> str:
    """A manifest's identity: the checksum of its bytes (two copies of one manifest are byte-identical)."""
    return checksum.digest(raw)


def _held_json(h: Held) -> list[object]:
    return [h.digest, sorted(h.listed), sorted(h.have), sorted(h.placed), dict(h.problems)]


def _held(doc: list[Any]) -> Held:
    digest, listed, have, placed, problems = doc
    return Held(str(digest), frozenset(map(str, listed)), frozenset(map(str, have)), frozenset(map(str, placed)),
                {str(k): str(v) for k, v in problems.items()})
