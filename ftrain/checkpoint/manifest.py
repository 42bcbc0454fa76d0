"""The manifest: the last file written into a checkpoint, and the proof that it is complete.

``manifest.json`` is ``{"body": {...}, "body_xxh3_128": "<hex>"}``. The body's
checksum is taken over its canonical JSON (sorted keys, no spaces), so a flipped
byte anywhere in the manifest is caught even when the JSON still parses.
Readers refuse format versions they do not know. See docs/FORMAT.md.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ftrain.checkpoint import checksum, codec, format
from ftrain.errors import CheckpointError, CorruptCheckpoint

FORMAT_NAME = "ftrain.checkpoint"
#: 2: state trees may hold ``{"$t": "alias"}`` values (a tensor stored once for every name it has). A
#: version-1 checkpoint is a version-2 checkpoint without aliases, so both read with the same code.
FORMAT_VERSION = 2
#: Versions this reader understands.
KNOWN_VERSIONS = frozenset({1, 2})


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str
    rank: int


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
    torch_version: str = field(default_factory=lambda: torch.__version__)
    format_version: int = FORMAT_VERSION
    #: Free-form JSON the session records (e.g. the names of saved objects).
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

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
            "files": {n: {"size": f.size, "checksum": f.checksum, "rank": f.rank}
                      for n, f in sorted(self.files.items())},
            "tensors": {
                n: {"file": t.file, "offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape)}
                for n, t in sorted(self.tensors.items())
            },
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        body = self.body()
        doc = {"body": body, f"body_{checksum.ALGORITHM}": checksum.digest(_canonical(body))}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


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
        raise CorruptCheckpoint(
            where, f"format version {version!r} is not known to this ftrain (knows {sorted(KNOWN_VERSIONS)}); "
            "upgrade ftrain to read it")
    algo = body.get("checksum_algorithm")
    if algo != checksum.ALGORITHM:
        raise CorruptCheckpoint(where, f"unknown checksum algorithm {algo!r}")
    want = doc.get(f"body_{algo}")
    got = checksum.digest(_canonical(body))
    if want != got:
        raise CorruptCheckpoint(where, f"manifest checksum mismatch (recorded {want}, computed {got})")
    if not isinstance(body.get("meta", {}), dict):
        raise CorruptCheckpoint(where, "manifest field 'meta' is not an object")
    try:
        files = {str(n): FileEntry(int(f["size"]), str(f["checksum"]), int(f["rank"]))
                 for n, f in body["files"].items()}
        tensors = {
            str(n): TensorEntry(str(t["file"]), int(t["offset"]), int(t["nbytes"]), str(t["dtype"]),
                                tuple(int(s) for s in t["shape"]))
            for n, t in body["tensors"].items()
        }
        m = Manifest(step=int(body["step"]), world_size=int(body["world_size"]), files=files, tensors=tensors,
                     created_unix=float(body["created_unix"]), ftrain_version=str(body["ftrain_version"]),
                     torch_version=str(body["torch_version"]), format_version=int(version),
                     meta=dict(body.get("meta") or {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(where, f"manifest field missing or malformed ({type(e).__name__}: {e})") from None
    _check_consistent(m, where)
    return m


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
        try:
            itemsize = codec.dtype_from_name(t.dtype).itemsize
        except CheckpointError as e:
            raise CorruptCheckpoint(where, f"tensor {name!r}: {e}") from None
        if any(d < 0 for d in t.shape) or math.prod(t.shape) * itemsize != t.nbytes:
            raise CorruptCheckpoint(where, f"tensor {name!r}: shape {list(t.shape)} x {t.dtype} != {t.nbytes} bytes")
        if t.offset < 0 or t.offset % format.ALIGN or t.offset + t.nbytes > holder.size:
            raise CorruptCheckpoint(where, f"tensor {name!r} lies outside {t.file} or is misaligned")
