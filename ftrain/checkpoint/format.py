"""Names on disk: every file and directory name of the checkpoint format, defined once.

The format itself (what each file holds, the commit protocol, the restore
rules) is specified in docs/FORMAT.md; this module only spells its names.
Pure; no I/O.
"""
from __future__ import annotations

import re

STEP_DIGITS = 12
STEP_PREFIX = "step-"
#: Anything starting with this is garbage from an interrupted operation (deleted at the next start).
TMP_PREFIX = ".tmp-"
#: A file being atomically replaced (``name.partial`` is renamed over ``name``).
PARTIAL_SUFFIX = ".partial"
#: A committed checkpoint moved aside while the same step is saved again.
REPLACED_PREFIX = f"{TMP_PREFIX}replaced-"
#: A committed checkpoint renamed before it is deleted by retention.
DELETING_PREFIX = f"{TMP_PREFIX}deleting-"
MANIFEST = "manifest.json"
LATEST = "latest"
#: In a local root with a remote tier: the newest step durable remotely, and a persisting upload failure.
REMOTE_STATUS = "remote.json"
BEST = "best"
#: The lease of the root (docs/FORMAT.md, "Lease"): the OS-lock file (created once, never replaced) and the
#: owner record. Neither is garbage (no ``.tmp-`` prefix, no ``.partial`` suffix) nor looks like ``step-*``.
LEASE_LOCK = "lease.lock"
LEASE_RECORD = "lease.json"
#: The identity of the disk a root lives on (docs/FORMAT.md, "Disks"): a random id created once. Ranks whose roots
#: hold the same id share one directory (a shared filesystem, or one node); different ids are node-local disks.
DISK_ID = "disk-id"
#: A file of a checkpoint found damaged on restore is renamed aside with this suffix inside its step directory (a
#: good copy may then be fetched in its place from a peer or the remote tier); nothing reads it again.
DAMAGED_SUFFIX = ".damaged"
#: A checkpoint found damaged as a whole is renamed ``damaged-step-N`` beside the step directories (docs/FORMAT.md,
#: "Quarantine"): out of discovery, restore and retention's count, kept for inspection. Neither garbage nor a step.
QUARANTINE_PREFIX = "damaged-"
#: Inside a quarantined directory: one line saying who set it aside, when and why.
QUARANTINE_NOTE = "quarantined.txt"
#: Tensor bytes inside shard files start at multiples of this, so every dtype can be viewed in place.
ALIGN = 64
#: The tree key (and tensor-name prefix) of the objects stored once for all ranks.
REPLICATED = "replicated"

# Size caps (docs/FORMAT.md, "Size caps"): a reader refuses a larger file before reading it, so a hostile or
# damaged file cannot make it allocate without bound. Generous: a manifest indexes every tensor of every rank
# (about 200 bytes each), so 64 MiB is some 300,000 tensors.
MAX_MANIFEST_BYTES = 64 << 20
#: One rank's shard JSON (its state trees and tensor index).
MAX_SHARD_JSON_BYTES = 64 << 20
#: ``latest`` and ``best`` hold one directory name.
MAX_POINTER_BYTES = 4096
#: A ``shard-R.error`` marker holds one error message.
MAX_ERROR_MARKER_BYTES = 64 << 10

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS}}})$")
_QUARANTINE_RE = re.compile(rf"^{QUARANTINE_PREFIX}{STEP_PREFIX}(\d{{{STEP_DIGITS}}})(?:-([1-9]\d{{0,5}}))?$")


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def quarantine_dirname(step: int, n: int = 1) -> str:
    """``damaged-step-N``; the ``n``-th damaged copy of one step (saved again, damaged again): ``damaged-step-N-n``."""
    base = f"{QUARANTINE_PREFIX}{step_dirname(step)}"
    return base if n == 1 else f"{base}-{n}"


def parse_quarantine_dirname(name: str) -> int | None:
    """The step of a quarantined directory's name, or None."""
    m = _QUARANTINE_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dirname(step: int, nonce: str) -> str:
    return f"{TMP_PREFIX}{step_dirname(step)}-{nonce}"


def rank_key(rank: int) -> str:
    """The tree key (and tensor-name prefix) of one rank's own state."""
    return f"rank-{rank:05d}"


def shard_names(rank: int) -> tuple[str, str]:
    """(state tree + index JSON, tensor bytes) file names for ``rank``."""
    return f"shard-{rank:05d}.json", f"shard-{rank:05d}.bin"


def is_garbage(name: str) -> bool:
    """A leftover of an interrupted save, prune or atomic write."""
    return name.startswith(TMP_PREFIX) or name.endswith(PARTIAL_SUFFIX)


#: Bytes per element of every tensor dtype a checkpoint may hold, by name (codec.DTYPES holds the torch dtypes;
#: a test keeps the two equal). Here without torch: the launcher and ``ftrain ckpt``/``status`` read manifests
#: without importing it (seconds saved at every relaunch).
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16, "int64": 8,
            "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
            "float8_e4m3fn": 1, "float8_e5m2": 1}


def itemsize(dtype: object) -> int | None:
    """Bytes per element of dtype name ``dtype``; None for a name no checkpoint may hold."""
    return ITEMSIZE.get(dtype) if isinstance(dtype, str) else None


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
