"""The manifest: the last file written into a checkpoint, and the proof that it is complete.

``manifest.json`` is ``{"body": {...}, "body_xxh3_128": "<hex>"}``. The body's
checksum is taken over its canonical JSON (sorted keys, no spaces), so a flipped
byte anywhere in the manifest is caught even when the JSON still parses.
Readers refuse format versions they do not know (:class:`ForeignCheckpoint`), and check the body as hostile
input, ``meta``'s object names included (:func:`check_meta`). See docs/FORMAT.md.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ftrain.checkpoint import checksum, format
from ftrain.errors import CorruptCheckpoint

FORMAT_NAME = "ftrain.checkpoint"
#: 2: state trees may hold ``{"$t": "alias"}`` values (a tensor stored once for every name it has). A
#: version-1 checkpoint is a version-2 checkpoint without aliases, so both read with the same code.
#: 3: sharded tensors (``{"$t": "dtensor"}``, the ``sharded`` table of chunks) and per-block checksums of every
#: ``.bin`` file. Versions 1 and 2 have neither, and read with the same code (whole-file checksums only).
#: 4: ``placement``, which disk each saving rank wrote its shard to (node-local checkpoint directories hold only
#: their own ranks' files, plus replicas); earlier versions were written into one directory, which holds them all.
FORMAT_VERSION = 4
#: Versions this reader understands.
KNOWN_VERSIONS = frozenset({1, 2, 3, 4})


class ForeignCheckpoint(CorruptCheckpoint):
    """A manifest another ftrain wrote that this one cannot read (a newer format version, another checksum
    algorithm or block size). Refused like damage, but never quarantined: an upgraded ftrain may read it."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str
    rank: int
    #: Version 3 ``.bin`` files: the checksum of each ``checksum.BLOCK_BYTES`` block, in order.
    blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ChunkEntry:
    """One saved piece of a sharded tensor: the box ``offsets``..``offsets + sizes`` of the global tensor, stored
    contiguously (row-major) at ``offset`` in ``file``."""

    file: str
    offset: int
    nbytes: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class ShardedEntry:
    """A tensor saved as chunks (an FSDP2 / DTensor parameter or optimizer state): never stored whole."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[ChunkEntry, ...]


@dataclass(frozen=True)
class TensorEntry:
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Manifest:
    step: int
    world_size: int
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    created_unix: float = field(default_factory=time.time)
    ftrain_version: str = ""
    torch_version: str = field(default_factory=lambda: _torch_version())
    format_version: int = FORMAT_VERSION
    #: Free-form JSON the session records (e.g. the names of saved objects).
    meta: dict[str, Any] = field(default_factory=dict)
    #: Sharded tensors by name (version 3).
    sharded: dict[str, ShardedEntry] = field(default_factory=dict)
    #: Version 4: disk id -> the saving ranks whose shard files were written to that disk (docs/FORMAT.md,
    #: "Disks"). Empty for earlier versions: one directory held every file.
    placement: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def files_of_ranks(self, ranks: Iterable[int]) -> set[str]:
        """The shard files the saving ``ranks`` wrote."""
        wanted = set(ranks)
        return {n for n, f in self.files.items() if f.rank in wanted}

    def primary_files(self, disk: str | None) -> set[str]:
        """The files a root on ``disk`` was written with at save time: every file for a checkpoint saved into one
        directory (no placement), none for a disk the placement does not name (e.g. one filled by fetching)."""
        if not self.placement:
            return set(self.files)
        return self.files_of_ranks(self.placement.get(disk or "", ()))

    def object_names(self) -> tuple[list[str], list[str]]:
        """(replicated, per_rank): the names of the saved objects, from ``meta`` (:func:`check_meta` checked them
        when the manifest was parsed)."""
        return list(self.meta.get("replicated") or []), list(self.meta.get("per_rank") or [])

    def name_table(self, name: str) -> dict[str, list[str]]:
        """``meta.frozen`` or ``meta.omitted``: object -> parameter names (checked when parsed); empty if absent."""
        return dict(self.meta.get(name) or {})

    def disk_of(self, rank: int) -> str | None:
        """The disk saving ``rank`` wrote to (None: no placement recorded)."""
        return next((d for d, ranks in self.placement.items() if rank in ranks), None)

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_unix)),
            "ftrain_version": self.ftrain_version,
            "torch_version": self.torch_version,
            "checksum_algorithm": checksum.ALGORITHM,
            "files": {n: _file_json(f) for n, f in sorted(self.files.items())},
            "tensors": {
                n: {"file": t.file, "offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape)}
                for n, t in sorted(self.tensors.items())
            },
            "meta": self.meta,
            **({"block_bytes": checksum.BLOCK_BYTES, "sharded": {
                n: {"shape": list(e.shape), "dtype": e.dtype, "chunks": [
                    {"file": c.file, "offset": c.offset, "nbytes": c.nbytes, "offsets": list(c.offsets),
                     "sizes": list(c.sizes)} for c in e.chunks]}
                for n, e in sorted(self.sharded.items())}} if self.format_version >= 3 else {}),
            **({"placement": {d: list(r) for d, r in sorted(self.placement.items())}}
               if self.format_version >= 4 and self.placement else {}),
        }

    def to_bytes(self) -> bytes:
        body = self.body()
        doc = {"body": body, f"body_{checksum.ALGORITHM}": checksum.digest(_canonical(body))}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _file_json(f: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"size": f.size, "checksum": f.checksum, "rank": f.rank}
    if f.blocks is not None:
        out["blocks"] = list(f.blocks)
    return out


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse(data: bytes, where: str) -> Manifest:
    """Parse and structurally check a manifest; raises :class:`CorruptCheckpoint` naming ``where``."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise CorruptCheckpoint(where, "manifest JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(where, f"manifest is not valid JSON ({e.msg} at byte {e.pos})") from None
    except UnicodeDecodeError as e:
        raise CorruptCheckpoint(where, f"manifest is not valid JSON (not UTF-8 at byte {e.start})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        raise CorruptCheckpoint(where, "manifest has no 'body' object")
    body = doc["body"]
    if body.get("format") != FORMAT_NAME:
        raise CorruptCheckpoint(where, f"not an ftrain manifest (format={body.get('format')!r})")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in KNOWN_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(KNOWN_VERSIONS)
        raise (ForeignCheckpoint if newer else CorruptCheckpoint)(
            where, f"format version {version!r} is not known to this ftrain (knows {sorted(KNOWN_VERSIONS)}); "
            "upgrade ftrain to read it")
    algo = body.get("checksum_algorithm")
    if algo != checksum.ALGORITHM:  # read before the body checksum (which it names) can prove the body intact
        raise (ForeignCheckpoint if isinstance(algo, str) else CorruptCheckpoint)(
            where, f"unknown checksum algorithm {algo!r}")
    want = doc.get(f"body_{algo}")
    got = checksum.digest(_canonical(body))
    if want != got:
        raise CorruptCheckpoint(where, f"manifest checksum mismatch (recorded {want}, computed {got})")
    if not isinstance(body.get("meta", {}), dict):
        raise CorruptCheckpoint(where, "manifest field 'meta' is not an object")
    try:
        if version >= 3 and body.get("block_bytes") != checksum.BLOCK_BYTES:  # the body is intact: another build
            raise ForeignCheckpoint(where, f"block size {body.get('block_bytes')!r} is not this ftrain's "
                                           f"{checksum.BLOCK_BYTES}")
        files = {str(n): FileEntry(int(f["size"]), str(f["checksum"]), int(f["rank"]),
                                   _blocks(f.get("blocks")) if version >= 3 else None)
                 for n, f in body["files"].items()}
        tensors = {
            str(n): TensorEntry(str(t["file"]), int(t["offset"]), int(t["nbytes"]), str(t["dtype"]),
                                tuple(int(s) for s in t["shape"]))
            for n, t in body["tensors"].items()
        }
        m = Manifest(step=int(body["step"]), world_size=int(body["world_size"]), files=files, tensors=tensors,
                     created_unix=float(body["created_unix"]), ftrain_version=str(body["ftrain_version"]),
                     torch_version=str(body["torch_version"]), format_version=int(version),
                     meta=dict(body.get("meta") or {}),
                     sharded=_parse_sharded(body.get("sharded") or {}) if version >= 3 else {},
                     placement=_parse_placement(body["placement"]) if version >= 4 and "placement" in body else {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(where, f"manifest field missing or malformed ({type(e).__name__}: {e})") from None
    _check_consistent(m, where)
    check_meta(m.meta, where)
    return m


def check_meta(meta: dict[str, Any], where: str) -> None:
    """The fields of ``meta`` a restore relies on before it looks at any registered object, as hostile input
    (docs/FORMAT.md, "manifest.json"): ``replicated`` and ``per_rank`` are lists of names, ``frozen`` and ``omitted``
    map objects to lists of names, and a module a trainable-only checkpoint leaves parameters out of records
    them as frozen and has a base fingerprint. The one definition restore, retention and ``ftrain ckpt`` share:
    a manifest that fails it is damage wherever it is read."""
    for name in ("replicated", "per_rank"):
        if not _names(meta.get(name) or []):
            raise CorruptCheckpoint(where, f"manifest meta.{name} is not a list of names")
    tables = {}
    for name in ("frozen", "omitted"):
        value = meta.get(name)
        if value is not None and not (isinstance(value, dict) and all(_names(v) for v in value.values())):
            raise CorruptCheckpoint(where, f"manifest meta.{name} is malformed: expected {{object: [names]}}")
        tables[name] = value or {}
    fingerprints = meta.get("base_fingerprint") or {}
    for key, names in tables["omitted"].items():
        if not set(names) <= set(tables["frozen"].get(key, ())):
            raise CorruptCheckpoint(where, f"{key!r}: the checkpoint omits parameters it does not record as frozen")
        if not (isinstance(fingerprints, dict) and isinstance(fingerprints.get(key), str)):
            raise CorruptCheckpoint(where, f"{key!r}: trainable-only checkpoint without a base fingerprint")


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _blocks(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise TypeError("blocks is not a list of checksums")
    return tuple(value)


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{value!r} is not a list of integers")
    return tuple(value)


#: A disk id as ``ftrain`` writes it (docs/FORMAT.md, "Disks"): lower-case hex.
_DISK_ID = re.compile(r"^[0-9a-f]{1,64}$")


def _parse_placement(table: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(table, dict) or not table:
        raise TypeError("placement is not a non-empty object")
    out = {}
    for disk, ranks in table.items():
        if not isinstance(disk, str) or not _DISK_ID.match(disk):
            raise ValueError(f"placement: {str(disk)[:80]!r} is not a disk id")
        out[disk] = _ints(ranks)
    return out


def _parse_sharded(table: Any) -> dict[str, ShardedEntry]:
    if not isinstance(table, dict):
        raise TypeError("sharded is not an object")
    return {str(n): ShardedEntry(_ints(e["shape"]), str(e["dtype"]), tuple(
        ChunkEntry(str(c["file"]), int(c["offset"]), int(c["nbytes"]), _ints(c["offsets"]), _ints(c["sizes"]))
        for c in e["chunks"])) for n, e in table.items()}


def _check_consistent(m: Manifest, where: str) -> None:
    """Refuse a manifest that is well-formed JSON but describes impossible files or tensors.

    Everything a reader later trusts (file names, sizes, tensor extents) is
    checked here, so a hostile manifest cannot point outside the checkpoint
    directory or ask for a huge allocation.
    """
    if m.world_size < 1 or m.step < 0:
        raise CorruptCheckpoint(where, f"impossible step {m.step} or world_size {m.world_size}")
    # Before building the expected names: the work must be bounded by what the manifest lists, not by a number
    # in it (a 3 KB manifest claiming a billion ranks).
    if len(m.files) != 2 * m.world_size:
        raise CorruptCheckpoint(where, f"lists {len(m.files)} files, which does not match world_size "
                                       f"{m.world_size} ({2 * m.world_size} shard files)")
    expected = {n for r in range(m.world_size) for n in format.shard_names(r)}
    if set(m.files) != expected:
        raise CorruptCheckpoint(where, f"file list {sorted(m.files)[:4]}... does not match world_size "
                                       f"{m.world_size} (expected shard-00000..{m.world_size - 1:05d} .json/.bin)")
    for name, f in m.files.items():
        if f.size < 0 or format.shard_names(f.rank)[name.endswith(".bin")] != name:
            raise CorruptCheckpoint(where, f"bad entry for {name}")
    for name, t in m.tensors.items():
        holder = m.files.get(t.file)
        if holder is None or not t.file.endswith(".bin"):
            raise CorruptCheckpoint(where, f"tensor {name!r} refers to {t.file!r}, not a listed .bin file")
        itemsize = format.itemsize(t.dtype)
        if itemsize is None:
            raise CorruptCheckpoint(where, f"tensor {name!r}: unknown tensor dtype {t.dtype!r} in checkpoint")
        if any(d < 0 for d in t.shape) or math.prod(t.shape) * itemsize != t.nbytes:
            raise CorruptCheckpoint(where, f"tensor {name!r}: shape {list(t.shape)} x {t.dtype} != {t.nbytes} bytes")
        if t.offset < 0 or t.offset % format.ALIGN or t.offset + t.nbytes > holder.size:
            raise CorruptCheckpoint(where, f"tensor {name!r} lies outside {t.file} or is misaligned")
    for name, f in m.files.items():
        if f.blocks is not None and (not name.endswith(".bin") or len(f.blocks) != checksum.block_count(f.size)):
            raise CorruptCheckpoint(where, f"{name}: {len(f.blocks)} block checksums for {f.size} bytes")
    for name, entry in m.sharded.items():
        _check_sharded(m, name, entry, where)
    if m.placement:
        placed = sorted(r for ranks in m.placement.values() for r in ranks)
        if placed != list(range(m.world_size)):
            raise CorruptCheckpoint(where, f"placement does not name each of the {m.world_size} saving ranks exactly "
                                           "once")


def _check_sharded(m: Manifest, name: str, e: ShardedEntry, where: str) -> None:
    """A sharded tensor's chunks lie inside their files and tile its global box exactly: each in bounds, none
    overlapping another, their volumes summing to the whole. A reader fills its new shards from them, so a gap
    would leave memory unwritten and an overlap would make the result depend on read order."""
    itemsize = format.itemsize(e.dtype)
    if itemsize is None:
        raise CorruptCheckpoint(where, f"sharded tensor {name!r}: unknown tensor dtype {e.dtype!r} in checkpoint")
    if name in m.tensors or any(d < 0 for d in e.shape):
        raise CorruptCheckpoint(where, f"sharded tensor {name!r}: also stored whole, or a negative dimension")
    for c in e.chunks:
        holder = m.files.get(c.file)
        if holder is None or not c.file.endswith(".bin") or holder.blocks is None:
            raise CorruptCheckpoint(where, f"sharded tensor {name!r} refers to {c.file!r}, not a listed .bin file "
                                           "with block checksums")
        if (len(c.offsets) != len(e.shape) or len(c.sizes) != len(e.shape)
                or any(o < 0 or s < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, e.shape, strict=True))):
            raise CorruptCheckpoint(where, f"sharded tensor {name!r}: chunk at {list(c.offsets)} of size "
                                           f"{list(c.sizes)} is outside its shape {list(e.shape)}")
        if math.prod(c.sizes) * itemsize != c.nbytes:
            raise CorruptCheckpoint(where, f"sharded tensor {name!r}: chunk of {list(c.sizes)} x {e.dtype} is not "
                                           f"{c.nbytes} bytes")
        if c.offset < 0 or c.offset % format.ALIGN or c.offset + c.nbytes > holder.size:
            raise CorruptCheckpoint(where, f"sharded tensor {name!r}: a chunk lies outside {c.file} or is misaligned")
    boxes = sorted((c.offsets, c.sizes) for c in e.chunks if math.prod(c.sizes))
    if sum(math.prod(s) for _, s in boxes) != math.prod(e.shape):
        raise CorruptCheckpoint(where, f"sharded tensor {name!r}: its chunks do not cover its shape {list(e.shape)}")
    # Sorted by their first offset, a box can only overlap the ones after it that start before it ends there.
    # (A 0-d tensor has one box of volume 1: the volume check above is the whole check.)
    for i, (o1, s1) in enumerate(boxes if e.shape else ()):
        for o2, s2 in boxes[i + 1:]:
            if o2[0] >= o1[0] + s1[0]:
                break
            if all(a < b + t and b < a + s for a, s, b, t in zip(o1, s1, o2, s2, strict=True)):
                raise CorruptCheckpoint(where, f"sharded tensor {name!r}: chunks at {list(o1)} and {list(o2)} "
                                               "overlap")


def _torch_version() -> str:
    import torch  # here, not at the top: readers of manifests (the launcher, the CLI) need no torch

    return str(torch.__version__)
