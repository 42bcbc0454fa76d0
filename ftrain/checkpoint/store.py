"""A checkpoint root: discovery, validation, the commit, cleanup, quarantine and retention (docs/FORMAT.md).

Every byte goes through a :class:`~ftrain.checkpoint.storage.Storage`; the
local filesystem is the default. Concurrency contract: any number of processes
may read (``infos``, ``validate``). Exactly one process per job and disk (its
leader, holding the lease) calls :meth:`commit`, :meth:`cleanup_temps` and
:meth:`retain`, and quarantines (``retention.py``); other ranks only write
their shard into the temp directory of the save in progress. One job per root;
a tool that quarantines (``ftrain ckpt verify --quarantine``) holds the lease too.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ftrain import __version__, faults
from ftrain.checkpoint import assembly, checksum, content, format, retention
from ftrain.checkpoint.manifest import ChunkEntry, FileEntry, ForeignCheckpoint, Manifest, ShardedEntry, parse
from ftrain.checkpoint.remote import RemotePath, RemoteStorage, is_url, objects_for
from ftrain.checkpoint.shard import ShardRecord
from ftrain.checkpoint.storage import LocalStorage, Storage
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint

log = logging.getLogger("ftrain.checkpoint")
_DISK_HEX = re.compile(r"^[0-9a-f]{32}$")
_ODD = "not a plain directory (a symbolic link or special file); ftrain never follows links in a checkpoint root"


@dataclass
class CheckpointInfo:
    """One committed-looking directory and what validation found."""

    step: int
    path: Path
    valid: bool
    reason: str = ""
    size: int = 0
    created_unix: float | None = None
    #: "" for a checkpoint whose every file is here; with node-local disks, which ranks' files are (the rest are
    #: on the other nodes' disks, docs/FORMAT.md "Disks").
    part: str = ""
    #: Not valid, and damaged as a whole here, so quarantine may set it aside: its manifest does not parse (and
    #: is not merely another ftrain's), or it was saved into this one directory and fails. Never a part of a
    #: checkpoint saved to several disks: what it lacks is elsewhere, and its files may be the only copies.
    damaged: bool = False


def open_store(location: str | os.PathLike[str]) -> CheckpointStore:
    """The store at ``location``: a local directory, or a remote tier URL (``s3://...``, any fsspec URL; see
    ``remote.py``). RemoteUnavailable (an OSError) if the URL's client library is missing."""
    if is_url(str(location)):
        storage = RemoteStorage(objects_for(str(location)))
        return CheckpointStore(RemotePath(storage), storage)
    return CheckpointStore(location)


class CheckpointStore:
    def __init__(self, root: str | os.PathLike[str] | RemotePath, storage: Storage | None = None) -> None:
        #: Where the root is, for messages and ``is_dir``: a local path, or a remote URL's stand-in.
        self.root: Path = root if isinstance(root, RemotePath) else Path(root)  # type: ignore[assignment]
        self.storage: Storage = storage if storage is not None else LocalStorage(self.root)
        self._disk: str | None = None

    @property
    def disk(self) -> str | None:
        """The id of the disk this root is on (docs/FORMAT.md, "Disks"), if it has one yet; read, never made
        (``disks.disk_id`` makes it)."""
        if self._disk is None and not isinstance(self.root, RemotePath):
            try:
                text = self.storage.read(format.DISK_ID, 256).decode(errors="replace").strip()
            except OSError:
                return None
            self._disk = text if _DISK_HEX.match(text) else None
        return self._disk

    @disk.setter
    def disk(self, value: str) -> None:
        self._disk = value

    def required_files(self, m: Manifest) -> set[str]:
        """The files of ``m`` this root must hold for its copy to be intact: all of them for a checkpoint saved
        into one directory; with node-local disks those its own ranks wrote (the rest are on other nodes'
        disks; whatever else is here, replicas and fetched files, is checked when present)."""
        if len(m.placement) <= 1:
            return set(m.files)
        return m.primary_files(self.disk)

    # ----------------------------------------------------------------- discovery
    def ensure_writable(self) -> None:
        """Create the root if needed and prove we can write in it; the error names the dir and the fix."""
        try:
            self.storage.ensure_writable()
        except OSError as e:
            raise CheckpointDirError(
                f"checkpoint dir {str(self.root)!r} is not writable ({e.strerror or e}); "
                "set checkpoint.dir (or --ckpt-dir / FTRAIN_CHECKPOINT_DIR) to a writable directory") from None

    def steps(self) -> list[int]:
        """Steps of the committed-looking checkpoint directories, oldest first."""
        out = []
        for entry in self.storage.list():
            step = format.parse_step_dirname(entry.name)
            if step is not None and entry.is_dir:
                out.append(step)
        return sorted(out)

    def odd_steps(self) -> list[int]:
        """Steps whose ``step-*`` name is not a plain directory (a link, a file, a FIFO): never read, reported."""
        return sorted(s for e in self.storage.list() if not e.is_dir
                      and (s := format.parse_step_dirname(e.name)) is not None)

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Committed-looking checkpoint directories, oldest first."""
        return [(step, self.path(step)) for step in self.steps()]

    def has(self, step: int) -> bool:
        return self.storage.is_dir(format.step_dirname(step))

    def path(self, step: int) -> Path:
        return self.root / format.step_dirname(step)

    def latest_hint(self) -> str | None:
        """What the ``latest`` pointer says (a hint for humans and tools; discovery never relies on it)."""
        return self._hint(format.LATEST)

    def best_hint(self) -> str | None:
        """What the ``best`` pointer says: the best checkpoint by the monitored metric (a hint, like ``latest``)."""
        return self._hint(format.BEST)

    def _hint(self, name: str) -> str | None:
        try:
            return self.storage.read(name, format.MAX_POINTER_BYTES).decode(errors="replace").strip() or None
        except OSError:
            return None

    def update_best_hint(self, step: int | None) -> None:
        """Point ``best`` at ``step``; with None, only remove a pointer whose checkpoint is gone."""
        if step is not None and self.has(step):
            self.storage.write(format.BEST, f"{format.step_dirname(step)}\n".encode())
            return
        hint = self.best_hint()
        if hint is not None and not self.storage.is_dir(hint):
            self.storage.delete(format.BEST)

    # ---------------------------------------------------------------- validation
    def read_manifest(self, step: int) -> Manifest:
        return self.read_manifest_raw(step)[0]

    def read_manifest_raw(self, step: int) -> tuple[Manifest, bytes]:
        """The manifest of ``step``, parsed and checked, and its bytes."""
        name = f"{format.step_dirname(step)}/{format.MANIFEST}"
        where = self.storage.describe(name)
        try:
            data = self.storage.read(name, format.MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise CorruptCheckpoint(where, "manifest missing (save was interrupted or the file was deleted)") from None
        except OSError as e:
            raise CorruptCheckpoint(where, f"cannot read manifest ({e.strerror})") from None
        m = parse(data, where)
        if m.step != step:
            raise CorruptCheckpoint(where, f"manifest says step {m.step} but the directory is for step {step}")
        return m, data

    def check_files(self, m: Manifest, *, whole: bool = False) -> set[str]:
        """Cheap check (no reading): every file this root must hold (:meth:`required_files`; with ``whole``,
        every listed file) exists with its listed size, and so does every other listed file present. Returns
        the listed files present."""
        have, _, problems = self._files(m, set(m.files) if whole else self.required_files(m))
        if problems:
            raise problems[min(problems)]
        return have

    def held(self, step: int) -> tuple[Manifest, bytes, set[str], dict[str, str]]:
        """What this root holds of ``step`` for the restore's holdings (``checkpoint/assembly.py``): the
        manifest, its raw bytes, the listed files present with their listed sizes (none read), and why each
        file this root must hold (:meth:`required_files`) but does not is missing (its full path: reason)."""
        m, raw = self.read_manifest_raw(step)
        have, _, problems = self._files(m, self.required_files(m))
        return m, raw, have, {name: str(e) for name, e in problems.items()}

    def _files(self, m: Manifest, required: set[str]) -> tuple[set[str], set[str], dict[str, CorruptCheckpoint]]:
        """(the listed files present with their listed sizes, the ``required`` ones missing, what is wrong with
        each file that is required or present but not right), by stat alone."""
        have: set[str] = set()
        missing: set[str] = set()
        problems: dict[str, CorruptCheckpoint] = {}
        for name, entry in sorted(m.files.items()):
            rel = f"{format.step_dirname(m.step)}/{name}"
            where = self.storage.describe(rel)
            try:
                size = self.storage.size(rel)
            except FileNotFoundError:
                if name in required:
                    missing.add(name)
                    problems[name] = CorruptCheckpoint(where, "file listed in the manifest is missing")
                continue
            except OSError as e:
                problems[name] = CorruptCheckpoint(where, f"cannot stat ({e.strerror or e})")
                continue
            if size == entry.size:
                have.add(name)
            else:
                problems[name] = CorruptCheckpoint(where, f"size {size} bytes, manifest says {entry.size} "
                                                          "(truncated or overwritten)")
        return have, missing, problems

    def validate(self, step: int, *, whole: bool = False) -> Manifest:
        """Full check of checkpoint ``step``: manifest, then the size and checksum (streamed) of every file this
        root must hold and of every other listed file it holds (all of them with ``whole``), then the content of
        the state trees here (``content.py``: what restore checks before it looks at any registered object)."""
        m = self.read_manifest(step)
        self._verify(m, whole=whole)
        return m

    def _verify(self, m: Manifest, *, whole: bool = False) -> None:
        present = self.check_files(m, whole=whole)
        for name, entry in sorted(m.files.items()):
            if name not in present:
                continue
            rel = f"{format.step_dirname(m.step)}/{name}"
            try:
                with self.storage.open(rel) as f:
                    digest, blocks = checksum.stream_blocks(f)
            except OSError as e:
                raise CorruptCheckpoint(self.storage.describe(rel), f"read error ({e.strerror or e})") from None
            if digest != entry.checksum:
                raise CorruptCheckpoint(self.storage.describe(rel),
                                        f"checksum mismatch (manifest {entry.checksum}, file {digest})")
            bad = [i for i, (a, b) in enumerate(zip(blocks, entry.blocks or blocks, strict=False)) if a != b]
            if bad:  # the whole file matches, its block list does not: the manifest lies about the blocks
                raise CorruptCheckpoint(self.storage.describe(rel), f"block {bad[0]} checksum mismatch")
        content.check_checkpoint(self.storage, m, present)

    def info(self, step: int) -> CheckpointInfo:
        """The full verdict on ``step`` (:meth:`validate`), with its size and, if valid, which part is here."""
        size = sum(e.size for e in self.storage.list(format.step_dirname(step)) if not e.is_dir)
        verdict = self.assess(step, full=True)
        verdict.size = size
        return verdict

    def assess(self, step: int, *, full: bool = False) -> CheckpointInfo:
        """This root's copy of ``step``: valid, or why not and whether it is damaged as a whole here
        (:attr:`CheckpointInfo.damaged`). ``full``: :meth:`validate`; otherwise the cheap checks restore
        proposes a checkpoint after (the manifest, the sizes of the files this root must hold)."""
        try:
            m = self.read_manifest(step)
        except CorruptCheckpoint as e:
            foreign = isinstance(e, ForeignCheckpoint)  # another ftrain's: not damage
            return CheckpointInfo(step, self.path(step), False, _reason(e), damaged=not foreign)
        # Damage as a whole only in a checkpoint saved into one directory: a part of one saved to several disks
        # may hold the only copies of its files, and what it lacks is elsewhere.
        one_dir = len(m.placement) <= 1
        _, missing, problems = self._files(m, self.required_files(m))
        if problems:
            # A file missing from a copy on another disk may simply not have been fetched there; a file present
            # but wrong is damage wherever it is.
            here = not m.placement or self.disk is None or self.disk in m.placement
            damaged = one_dir and (here or bool(problems.keys() - missing))
            return CheckpointInfo(step, self.path(step), False, _reason(problems[min(problems)]), damaged=damaged)
        if full:
            try:
                self._verify(m)
            except CorruptCheckpoint as e:
                return CheckpointInfo(step, self.path(step), False, _reason(e), damaged=one_dir)
        return CheckpointInfo(step, self.path(step), True, "", 0, m.created_unix, self.part(m) if full else "")

    def part(self, m: Manifest) -> str:
        """"" if this root holds every file of ``m``, else which saving ranks' files it holds (node-local)."""
        present = {n for n in m.files if self._has_file(m.step, n)}
        if present == set(m.files):
            return ""
        ranks = sorted({m.files[n].rank for n in present})
        return f"ranks {assembly.ranges(ranks) or 'none'} of {m.world_size} here"

    def require_whole(self, m: Manifest) -> None:
        """CheckpointError, naming what is here and where the rest is, if this root holds only part of ``m`` (a
        node-local disk): reading a whole checkpoint (export, inspect's objects) needs every file."""
        part = self.part(m)
        if part and len(m.placement) > 1:
            raise CheckpointError(
                f"{self.path(m.step)} holds only part of checkpoint step {m.step} ({part}): it was saved to "
                f"{len(m.placement)} node-local disks; use the remote tier's copy (e.g. `ftrain ckpt export "
                "s3://bucket/prefix ...`), or a disk that holds replicas of the others (checkpoint.replicas)")

    def _has_file(self, step: int, name: str) -> bool:
        try:
            self.storage.size(f"{format.step_dirname(step)}/{name}")
        except OSError:
            return False
        return True

    def infos(self) -> list[CheckpointInfo]:
        out = [self.info(step) for step in self.steps()]
        out += [CheckpointInfo(step, self.path(step), False, f"{format.step_dirname(step)}: {_ODD}")
                for step in self.odd_steps()]
        return sorted(out, key=lambda i: i.step)

    def manifests(self) -> list[Manifest]:
        """Every manifest that parses, oldest first; unreadable ones are skipped with a warning."""
        out = []
        for step in self.steps():
            try:
                out.append(self.read_manifest(step))
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint step %d: %s: %s", step, e.path, e.reason)
        return out

    def candidates(self, skip: set[int] | frozenset[int] = frozenset(), *, whole: bool = True) -> Iterator[Manifest]:
        """Committed-looking checkpoints, newest first, that pass the cheap checks (manifest + sizes; with
        ``whole`` every file must be here, else what this disk must hold).

        Checksums are verified by whoever reads the files (the restore protocol),
        so each byte is read once. Damaged ones are skipped with a warning naming file and reason.
        """
        for step in self.odd_steps():
            log.warning("ignoring %s: %s", format.step_dirname(step), _ODD)
        for step in reversed(self.steps()):
            if step in skip:
                continue
            try:
                m = self.read_manifest(step)
                self.check_files(m, whole=whole)
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %s: %s: %s; falling back to an older one",
                            format.step_dirname(step), e.path, e.reason)
                continue
            yield m

    # --------------------------------------------------------- writing (rank 0)
    def cleanup_temps(self) -> list[str]:
        """Remove temp directories and files left by killed saves and prunes.

        One exception: a committed checkpoint moved aside to be replaced
        (``.tmp-replaced-step-N-*``) whose ``step-N`` never arrived is moved back, not deleted.
        """
        removed: list[str] = []
        for entry in sorted(self.storage.list(), key=lambda e: e.name):
            if not format.is_garbage(entry.name):
                continue
            if entry.name.startswith(format.REPLACED_PREFIX):
                final = entry.name[len(format.REPLACED_PREFIX):].rsplit("-", 1)[0]
                if format.parse_step_dirname(final) is not None and not self.storage.is_dir(final):
                    self.storage.commit(entry.name, final)
                    log.warning("restored %s, which an interrupted save had moved aside", final)
                    continue
            self.storage.delete(entry.name)
            removed.append(entry.name)
        if removed:
            log.info("removed %d leftover(s) of interrupted saves: %s", len(removed), ", ".join(removed))
        return removed

    def records_in(self, tmp: str, world_size: int, nonce: str, step: int) -> list[tuple[ShardRecord, FileEntry]]:
        """Every rank's shard record in temp directory ``tmp`` (all of them written into this one directory), with
        the file entry of its JSON: what :func:`build_manifest` takes."""
        out = []
        for rank in range(world_size):
            rel = f"{tmp}/{format.shard_names(rank)[0]}"
            try:
                raw = self.storage.read(rel, format.MAX_SHARD_JSON_BYTES)
                rec = ShardRecord.from_json(json.loads(raw))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{self.storage.describe(rel)}: no readable shard record "
                                      f"({type(e).__name__}: {e})") from None
            if rec.nonce != nonce or rec.step != step or rec.rank != rank:
                raise CheckpointError(f"{self.storage.describe(rel)}: shard belongs to another save")
            out.append((rec, FileEntry(len(raw), checksum.digest(raw), rank)))
        return out

    def commit(self, tmp: str, *, step: int, world_size: int, nonce: str, meta: dict[str, object],
               guard: Callable[[], None] | None = None) -> Manifest:
        """Commit temp directory ``tmp``, into which every rank wrote its shard (one directory for the whole
        job): the manifest from its records, :meth:`commit_prepared`, then ``latest``."""
        manifest = build_manifest(self.records_in(tmp, world_size, nonce, step), step=step, meta=meta,
                                  placement={self.disk or "0": tuple(range(world_size))})
        self.commit_prepared(tmp, step, manifest.to_bytes(), nonce, guard)
        self.point_latest(step)
        return manifest

    def commit_prepared(self, tmp: str, step: int, manifest: bytes, nonce: str,
                        guard: Callable[[], None] | None = None) -> None:
        """Turn finished temp directory ``tmp`` (this disk's shards of ``step``, durable) into checkpoint ``step``
        here: write ``manifest`` into it, then rename it into place.

        A kill at any instant leaves either no new checkpoint (the temp dir is
        cleaned up on the next start) or a complete one. ``guard`` runs
        right before the rename that commits; if it raises, nothing is committed
        (the writer's lease check: a writer that lost the root must not commit).
        """
        faults.point("save.before_manifest", step=step, rank=0)
        # One directory sync makes every rank's renamed-in shard JSON durable before the manifest exists.
        self._sync(tmp)
        self.storage.write(f"{tmp}/{format.MANIFEST}", manifest)
        faults.point("save.before_rename", step=step, rank=0)
        if guard is not None:
            guard()
        final = format.step_dirname(step)
        if self.storage.is_dir(final):
            # Same step saved again (e.g. an earlier copy was corrupt, or resume=never over an old run).
            # Move the old one aside first: rename cannot replace a non-empty directory.
            aside = f"{format.REPLACED_PREFIX}{final}-{nonce}"
            self.storage.commit(final, aside)
            self.storage.commit(tmp, final)
            self.storage.delete(aside)
        else:
            self.storage.commit(tmp, final)

    def point_latest(self, step: int) -> None:
        """``latest`` names ``step`` (after its global commit: docs/FORMAT.md)."""
        faults.point("save.before_latest", step=step, rank=0)
        self.storage.write(format.LATEST, f"{format.step_dirname(step)}\n".encode())

    def withdraw(self, step: int) -> None:
        """Remove this disk's part of ``step``, committed here but never by the whole job (another disk failed)."""
        self.discard(format.step_dirname(step))

    def discard(self, name: str) -> bool:
        """Delete directory ``name`` of the root (a checkpoint, a quarantined one): renamed to ``.tmp-deleting-…``
        first, so a kill mid-delete leaves garbage (cleaned at the next start), never half a checkpoint."""
        aside = f"{format.DELETING_PREFIX}{name}"
        try:
            self.storage.commit(name, aside)
        except OSError:
            return False
        self.storage.delete(aside)
        return True

    def _sync(self, path: str) -> None:
        sync = getattr(self.storage, "fsync", None)
        if sync is not None:
            sync(path)

    def retain(self, step: int, keep_last: int, best: Iterable[int], protect: Iterable[int] = ()) -> list[int]:
        """After committing ``step``: point ``best`` at the best one, then prune (``retention.py``); returns the
        pruned steps. ``best`` lists the steps retention must keep as best ones, best first; ``protect`` other
        steps it must keep (uploads and replicas in flight, the newest safe one)."""
        return retention.retain(self, step, keep_last, best, protect)

    def intact(self, step: int) -> bool:
        """The cheap checks restore proposes a checkpoint after: its manifest parses and its files have their sizes."""
        return self.assess(step).valid


def _reason(e: CorruptCheckpoint) -> str:
    return f"{Path(e.path).name}: {e.reason}"


def build_manifest(records: list[tuple[ShardRecord, FileEntry]], *, step: int, meta: dict[str, object],
                   placement: dict[str, tuple[int, ...]]) -> Manifest:
    """The manifest of ``step`` from every rank's shard record and the entry of its JSON file, in rank order."""
    files: dict[str, FileEntry] = {}
    tensors = {}
    for rec, json_entry in records:
        files[rec.bin_name] = FileEntry(rec.bin_size, rec.bin_checksum, rec.rank, rec.bin_blocks)
        files[format.shard_names(rec.rank)[0]] = json_entry
        tensors.update(rec.tensors)
    return Manifest(step=step, world_size=len(records), files=files, tensors=tensors, ftrain_version=__version__,
                    meta=dict(meta), sharded=merge_chunks([r for r, _ in records]), placement=dict(placement))


def merge_chunks(records: list[ShardRecord]) -> dict[str, ShardedEntry]:
    """The manifest's ``sharded`` table from every rank's chunks; ranks that disagree on a tensor's global shape
    or dtype (different models on different ranks) fail the save instead of committing a checkpoint that cannot
    be read back."""
    out: dict[str, tuple[tuple[int, ...], str, list[ChunkEntry]]] = {}
    for rec in sorted(records, key=lambda r: r.rank):
        for name, (chunk, shape, dtype) in rec.chunks.items():
            have = out.setdefault(name, (shape, dtype, []))
            if (have[0], have[1]) != (shape, dtype):
                raise CheckpointError(f"saving step {rec.step}: rank {rec.rank} holds sharded tensor {name!r} as "
                                      f"{list(shape)} {dtype}, an earlier rank as {list(have[0])} {have[1]}; "
                                      "every rank must register the same model")
            have[2].append(chunk)
    return {n: ShardedEntry(shape, dtype, tuple(chunks)) for n, (shape, dtype, chunks) in out.items()}
