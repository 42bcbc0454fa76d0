"""Storage leaf: which disk a checkpoint root lives on (docs/FORMAT.md, "Disks").

Every root holds a ``disk-id`` file: a random id, created once by the first process that needs it. Ranks whose
roots hold the same id write into one directory (a shared filesystem, or the ranks of one node); ranks with
different ids have node-local disks that the others cannot see. That is how a job finds out, at every start,
which layout it runs on, instead of assuming one: the ranks exchange their ids (``session/layout.py``).

The id is created by a hard link of a complete temporary file, which fails if the name exists: two processes
racing on a shared directory both end up reading the winner's id, and nobody ever reads a half-written one.
"""
from __future__ import annotations

import errno
import os
import re
import secrets

from ftrain.checkpoint.format import DISK_ID, PARTIAL_SUFFIX
from ftrain.checkpoint.storage import LocalStorage, TooLarge, UnsafeEntry, fsync_dir
from ftrain.errors import CheckpointDirError

_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_BYTES = 256


def disk_id(storage: LocalStorage) -> str:
    """The id of the disk ``storage``'s root is on; created if the root has none. CheckpointDirError if the file
    is damaged or not a plain file (it names the file and the fix)."""
    where = storage.describe(DISK_ID)
    for _ in range(3):
        try:
            raw = storage.read(DISK_ID, _MAX_BYTES)
        except FileNotFoundError:
            _create(storage)
            continue
        except (UnsafeEntry, TooLarge) as e:
            raise CheckpointDirError(f"{where} is not a plain disk-id file ({e}); remove it (a new id is made at the "
                                     "next start)") from None
        text = raw.decode(errors="replace").strip()
        if not _ID.match(text):
            raise CheckpointDirError(f"{where} does not hold a disk id (32 hex digits); remove it (a new id is made "
                                     "at the next start)")
        return text
    raise CheckpointDirError(f"{where} keeps disappearing while it is read; is another program cleaning "
                             f"{storage.describe()}?")


def _create(storage: LocalStorage) -> None:
    tmp = storage.full(f"{DISK_ID}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{secrets.token_hex(16)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, storage.full(DISK_ID))  # fails if another process made one first: theirs is the id
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(storage.full())
