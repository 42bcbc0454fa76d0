"""A checkpoint root directory: discovery, validation, the commit, cleanup and retention.

Concurrency contract: any number of processes may read (``list``, ``validate``).
Exactly one process per job (rank 0) calls :meth:`commit`, :meth:`cleanup_temps`
and :meth:`prune`; other ranks only write their shard into the temp directory of
the save in progress. One job per checkpoint root.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ftrain import __version__, faults
from ftrain.checkpoint import checksum, layout
from ftrain.checkpoint.manifest import FileEntry, Manifest, parse
from ftrain.checkpoint.shard import ShardRecord
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint

log = logging.getLogger("ftrain.checkpoint")


@dataclass
class CheckpointInfo:
    """One committed-looking directory and what validation found."""

    step: int
    path: Path
    valid: bool
    reason: str = ""
    size: int = 0
    created_unix: float | None = None


class CheckpointStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- discovery
    def ensure_writable(self) -> None:
        """Create the root if needed and prove we can write in it; the error names the dir and the fix."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CheckpointDirError(
                f"checkpoint dir {str(self.root)!r} is not writable ({e.strerror or e}); "
                "set checkpoint.dir (or --ckpt-dir / FTRAIN_CHECKPOINT_DIR) to a writable directory") from None

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Committed-looking checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in os.scandir(self.root):
            step = layout.parse_step_dirname(entry.name)
            if step is not None and entry.is_dir():
                out.append((step, Path(entry.path)))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.root / layout.step_dirname(step)

    def latest_hint(self) -> str | None:
        """What the ``latest`` pointer says (a hint for humans and tools; discovery never relies on it)."""
        try:
            return (self.root / layout.LATEST).read_text().strip() or None
        except OSError:
            return None

    # ---------------------------------------------------------------- validation
    def read_manifest(self, step: int) -> Manifest:
        path = self.path(step) / layout.MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptCheckpoint(str(path), "manifest missing (save was interrupted or the file was deleted)") from None
        except OSError as e:
            raise CorruptCheckpoint(str(path), f"cannot read manifest ({e.strerror})") from None
        m = parse(data, str(path))
        if m.step != step:
            raise CorruptCheckpoint(str(path), f"manifest says step {m.step} but the directory is for step {step}")
        return m

    def read_file(self, step: int, name: str, entry: FileEntry) -> bytearray:
        """Read one file whole, checking its size and checksum on the way."""
        path = self.path(step) / name
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CorruptCheckpoint(str(path), "file listed in the manifest is missing") from None
        if size != entry.size:
            raise CorruptCheckpoint(str(path), f"size {size} bytes, manifest says {entry.size} (truncated or overwritten)")
        buf = bytearray(size)
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise CorruptCheckpoint(str(path), f"short read at byte {got} of {size}")
                got += n
        actual = checksum.digest(buf)
        if actual != entry.checksum:
            raise CorruptCheckpoint(str(path), f"checksum mismatch (manifest {entry.checksum}, file {actual})")
        return buf

    def validate(self, step: int, keep: set[str] | frozenset[str] = frozenset()) -> tuple[Manifest, dict[str, bytearray]]:
        """Check every file of checkpoint ``step``; return its manifest and the bytes of the files in ``keep``.

        Reading and checking in one pass means the files a loader needs are read once.
        """
        m = self.read_manifest(step)
        kept: dict[str, bytearray] = {}
        for name, entry in sorted(m.files.items()):
            buf = self.read_file(step, name, entry)
            if name in keep:
                kept[name] = buf
        return m, kept

    def info(self, step: int) -> CheckpointInfo:
        path = self.path(step)
        size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) if path.is_dir() else 0
        try:
            m, _ = self.validate(step)
        except CorruptCheckpoint as e:
            return CheckpointInfo(step, path, False, f"{Path(e.path).name}: {e.reason}", size)
        return CheckpointInfo(step, path, True, "", size, m.created_unix)

    def list(self) -> list[CheckpointInfo]:
        return [self.info(step) for step, _ in self.step_dirs()]

    def newest_valid(self, keep: set[str] | frozenset[str] = frozenset()
                     ) -> tuple[Manifest, dict[str, bytearray]] | None:
        """The newest checkpoint that validates, skipping (and warning about) damaged ones."""
        for step, path in reversed(self.step_dirs()):
            try:
                return self.validate(step, keep)
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %s: %s: %s; falling back to an older one", path.name,
                            e.path, e.reason)
        return None

    # --------------------------------------------------------- writing (rank 0)
    def cleanup_temps(self, keep_nonce: str | None = None) -> list[Path]:
        """Remove temp directories and files left by killed saves (except the save ``keep_nonce``)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in os.scandir(self.root):
            stale = entry.name.startswith(layout.TMP_PREFIX) or entry.name.endswith(".partial")
            if not stale or (keep_nonce and entry.name.endswith(f"-{keep_nonce}")):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            log.info("removed %d leftover(s) of interrupted saves: %s", len(removed),
                     ", ".join(p.name for p in removed))
        return removed

    def wait_for_shards(self, tmpdir: Path, world_size: int, nonce: str, timeout: float) -> list[ShardRecord]:
        """Block until every rank's shard JSON has appeared in ``tmpdir`` (each is renamed in when durable)."""
        deadline = time.monotonic() + timeout
        pending = set(range(world_size))
        records: dict[int, ShardRecord] = {}
        delay = 0.001
        while pending:
            for rank in sorted(pending):
                path = tmpdir / layout.shard_names(rank)[0]
                try:
                    data = json.loads(path.read_bytes())
                except FileNotFoundError:
                    continue
                rec = ShardRecord.from_json(data)
                if rec.nonce != nonce:
                    raise CheckpointError(f"{path}: shard belongs to another save ({rec.nonce} != {nonce})")
                records[rank] = rec
                pending.discard(rank)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"save into {tmpdir.name} timed out after {timeout:.0f}s waiting for rank(s) {sorted(pending)}; "
                    "raise checkpoint.commit_timeout_seconds if their disks are slow")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return [records[r] for r in range(world_size)]

    def commit(self, tmpdir: Path, *, step: int, world_size: int, nonce: str, timeout: float,
               meta: dict[str, object]) -> Manifest:
        """Turn a finished temp directory into checkpoint ``step``: manifest, rename, ``latest``.

        A kill at any instant leaves either no new checkpoint (the temp dir is
        cleaned up on the next start) or a complete, valid one.
        """
        records = self.wait_for_shards(tmpdir, world_size, nonce, timeout)
        files: dict[str, FileEntry] = {}
        tensors = {}
        for rec in records:
            json_name = layout.shard_names(rec.rank)[0]
            files[rec.bin_name] = FileEntry(rec.bin_size, rec.bin_checksum, rec.rank)
            size, digest = checksum.file_digest(tmpdir / json_name)
            files[json_name] = FileEntry(size, digest, rec.rank)
            tensors.update(rec.tensors)
        manifest = Manifest(step=step, world_size=world_size, files=files, tensors=tensors,
                            ftrain_version=__version__, meta=dict(meta))
        faults.point("save.before_manifest", step=step, rank=0)
        # One directory fsync makes every rank's renamed-in shard JSON durable before the manifest exists.
        layout.fsync_dir(tmpdir)
        layout.atomic_write(tmpdir / layout.MANIFEST, manifest.to_bytes())
        faults.point("save.before_rename", step=step, rank=0)
        final = self.path(step)
        if final.exists():
            # Same step saved again (e.g. an earlier copy was corrupt, or resume=never over an old run).
            # Move the old one aside first: rename cannot replace a non-empty directory.
            aside = self.root / f"{layout.TMP_PREFIX}replaced-{final.name}-{nonce}"
            os.replace(final, aside)
            os.replace(tmpdir, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmpdir, final)
        layout.fsync_dir(self.root)
        faults.point("save.before_latest", step=step, rank=0)
        layout.atomic_write(self.root / layout.LATEST, f"{final.name}\n".encode())
        return manifest

    def prune(self, keep_last: int, protect: set[int]) -> list[int]:
        """Delete committed checkpoints beyond the newest ``keep_last`` (0 keeps all), never those in ``protect``."""
        if keep_last <= 0:
            return []
        steps = [s for s, _ in self.step_dirs()]
        doomed = [s for s in steps[:-keep_last] if s not in protect]
        for step in doomed:
            # Rename first so a kill mid-delete leaves a temp dir (cleaned later), not a half checkpoint.
            path = self.path(step)
            aside = self.root / f"{layout.TMP_PREFIX}deleting-{path.name}"
            try:
                os.replace(path, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
        return doomed
