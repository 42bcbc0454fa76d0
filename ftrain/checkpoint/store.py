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
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftrain import __version__, faults
from ftrain.checkpoint import checksum, layout
from ftrain.checkpoint.manifest import FileEntry, Manifest, parse
from ftrain.checkpoint.shard import ShardRecord
from ftrain.errors import CheckpointDirError, CheckpointError, CorruptCheckpoint

log = logging.getLogger("ftrain.checkpoint")
_REPLACED = f"{layout.TMP_PREFIX}replaced-"


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
            probe = self.root / f"{layout.TMP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
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
        return self._hint(layout.LATEST)

    def best_hint(self) -> str | None:
        """What the ``best`` pointer says: the best checkpoint by the monitored metric (a hint, like ``latest``)."""
        return self._hint(layout.BEST)

    def _hint(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text().strip() or None
        except OSError:
            return None

    def update_best_hint(self, step: int | None) -> None:
        """Point ``best`` at ``step``; with None, only remove a pointer whose checkpoint is gone."""
        if step is not None and self.path(step).is_dir():
            layout.atomic_write(self.root / layout.BEST, f"{layout.step_dirname(step)}\n".encode())
            return
        hint = self.best_hint()
        if hint is not None and not (self.root / hint).is_dir():
            (self.root / layout.BEST).unlink(missing_ok=True)

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

    def check_files(self, m: Manifest) -> None:
        """Cheap check: every listed file exists with its listed size (no reading)."""
        for name, entry in sorted(m.files.items()):
            path = self.path(m.step) / name
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise CorruptCheckpoint(str(path), "file listed in the manifest is missing") from None
            except OSError as e:
                raise CorruptCheckpoint(str(path), f"cannot stat ({e.strerror or e})") from None
            if size != entry.size:
                raise CorruptCheckpoint(str(path), f"size {size} bytes, manifest says {entry.size} "
                                                  "(truncated or overwritten)")

    def validate(self, step: int) -> Manifest:
        """Full check of checkpoint ``step``: manifest, then every file's size and checksum (streamed)."""
        m = self.read_manifest(step)
        self.check_files(m)
        for name, entry in sorted(m.files.items()):
            path = self.path(step) / name
            try:
                _, digest = checksum.file_digest(path)
            except OSError as e:
                raise CorruptCheckpoint(str(path), f"read error ({e.strerror or e})") from None
            if digest != entry.checksum:
                raise CorruptCheckpoint(str(path), f"checksum mismatch (manifest {entry.checksum}, file {digest})")
        return m

    def info(self, step: int) -> CheckpointInfo:
        path = self.path(step)
        size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) if path.is_dir() else 0
        try:
            m = self.validate(step)
        except CorruptCheckpoint as e:
            return CheckpointInfo(step, path, False, f"{Path(e.path).name}: {e.reason}", size)
        return CheckpointInfo(step, path, True, "", size, m.created_unix)

    def list(self) -> list[CheckpointInfo]:
        return [self.info(step) for step, _ in self.step_dirs()]

    def candidates(self, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[Manifest]:
        """Committed-looking checkpoints, newest first, that pass the cheap checks (manifest + sizes).

        Checksums are verified by whoever reads the files (see ``Session.restore``),
        so each byte is read once. Damaged ones are skipped with a warning naming file and reason.
        """
        for step, path in reversed(self.step_dirs()):
            if step in skip:
                continue
            try:
                m = self.read_manifest(step)
                self.check_files(m)
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %s: %s: %s; falling back to an older one", path.name,
                            e.path, e.reason)
                continue
            yield m

    # --------------------------------------------------------- writing (rank 0)
    def cleanup_temps(self) -> list[Path]:
        """Remove temp directories and files left by killed saves and prunes.

        One exception: a committed checkpoint moved aside to be replaced
        (``.tmp-replaced-step-N-*``) whose ``step-N`` never arrived is moved back, not deleted.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            stale = entry.name.startswith(layout.TMP_PREFIX) or entry.name.endswith(".partial")
            if not stale:
                continue
            path = Path(entry.path)
            if entry.name.startswith(_REPLACED):
                final = self.root / entry.name[len(_REPLACED):].rsplit("-", 1)[0]
                if not final.exists():
                    os.replace(path, final)
                    log.warning("restored %s, which an interrupted save had moved aside", final.name)
                    continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            log.info("removed %d leftover(s) of interrupted saves: %s", len(removed),
                     ", ".join(p.name for p in removed))
        return removed

    def wait_for_shards(self, tmpdir: Path, step: int, world_size: int, nonce: str, timeout: float
                        ) -> list[ShardRecord]:
        """Block until every rank's shard JSON has appeared in ``tmpdir`` (each is renamed in when durable)."""
        deadline = time.monotonic() + timeout
        pending = set(range(world_size))
        records: dict[int, ShardRecord] = {}
        delay = 0.001
        while pending:
            for rank in sorted(pending):
                failed = tmpdir / layout.shard_error_name(rank)
                if failed.exists():
                    raise CheckpointError(f"rank {rank} failed to write its shard of step {step}: "
                                          f"{failed.read_text(errors='replace').strip()}")
                path = tmpdir / layout.shard_names(rank)[0]
                try:
                    rec = ShardRecord.from_json(json.loads(path.read_bytes()))
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{path}: unreadable shard record ({type(e).__name__}: {e})") from None
                if rec.nonce != nonce or rec.step != step:
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
        records = self.wait_for_shards(tmpdir, step, world_size, nonce, timeout)
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
            aside = self.root / f"{_REPLACED}{final.name}-{nonce}"
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
