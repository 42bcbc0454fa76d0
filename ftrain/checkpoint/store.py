"""A checkpoint root: discovery, validation, the commit, cleanup and retention (docs/FORMAT.md).

Every byte goes through a :class:`~ftrain.checkpoint.storage.Storage`; the
local filesystem is the default. Concurrency contract: any number of processes
may read (``infos``, ``validate``). Exactly one process per job (rank 0) calls
:meth:`commit`, :meth:`cleanup_temps` and :meth:`retain`; other ranks only write
their shard into the temp directory of the save in progress. One job per root.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ftrain import __version__, faults
from ftrain.checkpoint import checksum, format
from ftrain.checkpoint.manifest import ChunkEntry, FileEntry, Manifest, ShardedEntry, parse
from ftrain.checkpoint.remote import RemotePath, RemoteStorage, is_url, objects_for
from ftrain.checkpoint.shard import ShardRecord
from ftrain.checkpoint.storage import LocalStorage, Storage
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint

log = logging.getLogger("ftrain.checkpoint")
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
        return m

    def check_files(self, m: Manifest) -> None:
        """Cheap check: every listed file exists with its listed size (no reading)."""
        for name, entry in sorted(m.files.items()):
            rel = f"{format.step_dirname(m.step)}/{name}"
            where = self.storage.describe(rel)
            try:
                size = self.storage.size(rel)
            except FileNotFoundError:
                raise CorruptCheckpoint(where, "file listed in the manifest is missing") from None
            except OSError as e:
                raise CorruptCheckpoint(where, f"cannot stat ({e.strerror or e})") from None
            if size != entry.size:
                raise CorruptCheckpoint(where, f"size {size} bytes, manifest says {entry.size} "
                                               "(truncated or overwritten)")

    def validate(self, step: int) -> Manifest:
        """Full check of checkpoint ``step``: manifest, then every file's size and checksum (streamed)."""
        m = self.read_manifest(step)
        self.check_files(m)
        for name, entry in sorted(m.files.items()):
            rel = f"{format.step_dirname(step)}/{name}"
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
        return m

    def info(self, step: int) -> CheckpointInfo:
        size = sum(e.size for e in self.storage.list(format.step_dirname(step)) if not e.is_dir)
        try:
            m = self.validate(step)
        except CorruptCheckpoint as e:
            return CheckpointInfo(step, self.path(step), False, f"{Path(e.path).name}: {e.reason}", size)
        return CheckpointInfo(step, self.path(step), True, "", size, m.created_unix)

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

    def candidates(self, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[Manifest]:
        """Committed-looking checkpoints, newest first, that pass the cheap checks (manifest + sizes).

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
                self.check_files(m)
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

    def wait_for_shards(self, tmp: str, step: int, world_size: int, nonce: str, timeout: float
                        ) -> list[ShardRecord]:
        """Block until every rank's shard JSON has appeared in ``tmp`` (each is renamed in when durable)."""
        deadline = time.monotonic() + timeout
        pending = set(range(world_size))
        records: dict[int, ShardRecord] = {}
        delay = 0.001
        while pending:
            for rank in sorted(pending):
                try:
                    reason = self.storage.read(f"{tmp}/{format.shard_error_name(rank)}", format.MAX_ERROR_MARKER_BYTES)
                except FileNotFoundError:
                    pass
                else:
                    raise CheckpointError(f"rank {rank} failed to write its shard of step {step}: "
                                          f"{reason.decode(errors='replace').strip()}")
                rel = f"{tmp}/{format.shard_names(rank)[0]}"
                try:
                    rec = ShardRecord.from_json(json.loads(self.storage.read(rel, format.MAX_SHARD_JSON_BYTES)))
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{self.storage.describe(rel)}: unreadable shard record "
                                          f"({type(e).__name__}: {e})") from None
                if rec.nonce != nonce or rec.step != step:
                    raise CheckpointError(f"{self.storage.describe(rel)}: shard belongs to another save "
                                          f"({rec.nonce} != {nonce})")
                records[rank] = rec
                pending.discard(rank)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"save into {tmp} timed out after {timeout:.0f}s waiting for rank(s) {sorted(pending)}; "
                    "raise checkpoint.commit_timeout_seconds if their disks are slow")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return [records[r] for r in range(world_size)]

    def commit(self, tmp: str, *, step: int, world_size: int, nonce: str, timeout: float,
               meta: dict[str, object], guard: Callable[[], None] | None = None) -> Manifest:
        """Turn the finished temp directory ``tmp`` into checkpoint ``step``: manifest, rename, ``latest``.

        A kill at any instant leaves either no new checkpoint (the temp dir is
        cleaned up on the next start) or a complete, valid one. ``guard`` runs
        right before the rename that commits; if it raises, nothing is committed
        (the writer's lease check: a writer that lost the root must not commit).
        """
        records = self.wait_for_shards(tmp, step, world_size, nonce, timeout)
        files: dict[str, FileEntry] = {}
        tensors = {}
        for rec in records:
            json_name = format.shard_names(rec.rank)[0]
            files[rec.bin_name] = FileEntry(rec.bin_size, rec.bin_checksum, rec.rank, rec.bin_blocks)
            with self.storage.open(f"{tmp}/{json_name}") as f:
                size, digest = checksum.stream_digest(f)
            files[json_name] = FileEntry(size, digest, rec.rank)
            tensors.update(rec.tensors)
        manifest = Manifest(step=step, world_size=world_size, files=files, tensors=tensors,
                            ftrain_version=__version__, meta=dict(meta), sharded=merge_chunks(records))
        faults.point("save.before_manifest", step=step, rank=0)
        # One directory sync makes every rank's renamed-in shard JSON durable before the manifest exists.
        self._sync(tmp)
        self.storage.write(f"{tmp}/{format.MANIFEST}", manifest.to_bytes())
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
        faults.point("save.before_latest", step=step, rank=0)
        self.storage.write(format.LATEST, f"{final}\n".encode())
        return manifest

    def _sync(self, path: str) -> None:
        sync = getattr(self.storage, "fsync", None)
        if sync is not None:
            sync(path)

    def retain(self, step: int, keep_last: int, best: Iterable[int]) -> list[int]:
        """After committing ``step``: point ``best`` at the best one, then prune; returns the pruned steps.

        ``best`` lists the steps retention must keep as best ones, best first.
        A best step with no directory (its save failed) is neither protected nor
        pointed to. The pointer is written before pruning, like the commit's
        other pointers, and never left naming a pruned step.
        """
        kept_best = [s for s in best if s == step or self.has(s)]
        self.update_best_hint(kept_best[0] if kept_best else None)
        pruned = self.prune(keep_last, protect={step, *kept_best})
        if pruned and not kept_best:  # a pointer left from an earlier ranking may name a step just pruned
            self.update_best_hint(None)
        return pruned

    def intact(self, step: int) -> bool:
        """The cheap checks restore proposes a checkpoint after: its manifest parses and its files have their sizes."""
        try:
            self.check_files(self.read_manifest(step))
        except CorruptCheckpoint:
            return False
        return True

    def prune(self, keep_last: int, protect: set[int]) -> list[int]:
        """Delete committed checkpoints beyond the newest ``keep_last`` intact ones (0 keeps all), never those in
        ``protect``.

        Only intact checkpoints count: damaged ones at higher steps (a run that
        resumed below them) must not push good ones out. A damaged checkpoint is
        deleted only when it is older than every one kept; newer damaged ones are
        left for the run to overwrite when it reaches their step.
        """
        if keep_last <= 0:
            return []
        steps = self.steps()
        good = [s for s in steps if s in protect or self.intact(s)]
        kept = set(good[-keep_last:]) | protect
        oldest_kept = min(kept, default=0)
        doomed = [s for s in steps if s not in kept and (s in good or s < oldest_kept)]
        for step in doomed:
            # Rename first so a kill mid-delete leaves a temp dir (cleaned later), not a half checkpoint.
            name = format.step_dirname(step)
            aside = f"{format.DELETING_PREFIX}{name}"
            try:
                self.storage.commit(name, aside)
            except OSError:
                continue
            self.storage.delete(aside)
        return doomed


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
