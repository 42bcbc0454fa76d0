"""Names on disk and the durable-write primitives the commit protocol is built from.

Layout of a checkpoint root (see docs/FORMAT.md)::

    ROOT/
      step-000000000100/        committed checkpoint (name order == step order)
        manifest.json           written last; its presence + validity == "committed"
        shard-00000.json        rank 0's state tree and tensor index
        shard-00000.bin         rank 0's tensor bytes
        shard-00001.json ...
      .tmp-step-000000000110-<nonce>/   a save in progress (or left by a kill)
      latest                    "step-000000000100\\n"; a hint, never trusted alone
"""
from __future__ import annotations

import os
import re
from pathlib import Path

STEP_DIGITS = 12
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
#: Tensor bytes inside shard files start at multiples of this, so every dtype can be viewed in place.
ALIGN = 64

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS}}})$")


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dirname(step: int, nonce: str) -> str:
    return f"{TMP_PREFIX}{step_dirname(step)}-{nonce}"


def shard_names(rank: int) -> tuple[str, str]:
    """(state tree + index JSON, tensor bytes) file names for ``rank``."""
    return f"shard-{rank:05d}.json", f"shard-{rank:05d}.bin"


def shard_error_name(rank: int) -> str:
    """Written by a rank whose shard write failed, so the committing rank stops waiting at once."""
    return f"shard-{rank:05d}.error"


def fsync_dir(path: str | Path) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: Path, data: bytes, *, fsync_parent: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Write to a sibling temp name, fsync it, rename over ``path``, then fsync the
    directory so the rename itself survives a power cut.
    """
    tmp = path.with_name(f"{path.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync_parent:
        fsync_dir(path.parent)


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
