"""Storage leaf: bring a remote checkpoint's files to the local disk, verifying every byte as it streams.

A restore on a machine whose local disk lacks the checkpoint (a fresh spot VM)
downloads it: each rank fetches only the shard files it owns into the local
temp directory of the download (``.tmp-...``, removed at the next start if
the download is interrupted), checking each file's size and XXH3 checksum
against the remote manifest as the bytes arrive, in parallel across files.
The caller then commits the directory locally (manifest included) and restores
from it as from any local checkpoint, so every check of a local restore
(hostile input, size caps, tree validation) applies to remote bytes too.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ftrain.checkpoint import format
from ftrain.checkpoint.checksum import Hasher
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.remote import CHUNK, RemoteStorage
from ftrain.checkpoint.storage import LocalStorage, write_all
from ftrain.errors import CorruptCheckpoint

#: Files fetched at once by one rank.
PARALLEL_FILES = 4


def download_files(remote: RemoteStorage, local: LocalStorage, manifest: Manifest, names: Iterable[str],
                   tmp: str) -> int:
    """Fetch ``names`` of checkpoint ``manifest`` from ``remote`` into local directory ``tmp``; bytes fetched.

    Raises :class:`CorruptCheckpoint` (naming the remote object) for a missing object, one of another size, or
    one whose checksum differs from the manifest's: damage, so the restore falls back to an older checkpoint.
    """
    ckpt = format.step_dirname(manifest.step)
    local.makedir(tmp)

    def one(name: str) -> int:
        entry = manifest.files[name]
        src = f"{ckpt}/{name}"
        where = remote.describe(src)
        hasher, size = Hasher(), 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with remote.open(src) as f, local.create(f"{tmp}/{name}") as fd:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    size += n
                    if size > entry.size:
                        raise CorruptCheckpoint(where, f"longer than the {entry.size} bytes the manifest lists")
                    hasher.update(view[:n])
                    write_all(fd, view[:n])
        except FileNotFoundError:
            raise CorruptCheckpoint(where, "missing from the remote tier") from None
        if size != entry.size:
            raise CorruptCheckpoint(where, f"{size} bytes, the manifest lists {entry.size}")
        if hasher.hexdigest() != entry.checksum:
            raise CorruptCheckpoint(where, f"checksum mismatch (recorded {entry.checksum}, computed "
                                           f"{hasher.hexdigest()})")
        return size

    wanted = sorted(names)
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES, thread_name_prefix="ftrain-download") as pool:
        total = sum(f.result() for f in [pool.submit(one, n) for n in wanted])
    local.fsync(tmp)
    return total


def files_of(manifest: Manifest, rank: int) -> list[str]:
    """The files of ``manifest`` that rank ``rank`` owns (downloads)."""
    return sorted(n for n, e in manifest.files.items() if e.rank == rank)


def orphan_ranks(manifest: Manifest, world_size: int) -> list[int]:
    """Saving ranks with no rank of a ``world_size`` run to download their files (a resize to fewer ranks): rank 0
    fetches those."""
    return [r for r in range(manifest.world_size) if r >= world_size]
