"""One rank's share of a checkpoint: ``shard-RRRRR.bin`` (tensor bytes) and ``shard-RRRRR.json``.

The JSON holds the rank's state trees (see ``codec``), the index of its tensors
in the .bin file, and the .bin file's size and checksum. It is renamed into place
only after the .bin file is fsynced, so its appearance tells the committing rank
that this shard is durable; the commit protocol relies on nothing else.
Writing is in ``snapshot.py``; this module holds the record and the readers.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from ftrain.checkpoint import checksum
from ftrain.checkpoint.format import MAX_SHARD_JSON_BYTES, shard_names
from ftrain.checkpoint.manifest import ChunkEntry, FileEntry, Manifest, TensorEntry
from ftrain.checkpoint.storage import Storage
from ftrain.errors import CorruptCheckpoint

if TYPE_CHECKING:  # torch is imported where tensors are made: reading records (the launcher, the CLI) needs none
    import torch

#: 2: the .bin's block checksums, and the chunks of sharded tensors this rank holds. Version 1 is read too.
SHARD_VERSION = 2
_KNOWN_SHARD_VERSIONS = (1, 2)
_ZEROS = bytes(64)
#: Tensors a reader does not keep are streamed through a buffer of this size (to checksum them).
_SKIP_CHUNK = 4 << 20


@dataclass
class ShardRecord:
    """What a shard's JSON says; the committing rank merges these into the manifest."""

    rank: int
    step: int
    nonce: str
    bin_name: str
    bin_size: int
    bin_checksum: str
    tensors: dict[str, TensorEntry]
    trees: dict[str, Any]
    bin_blocks: tuple[str, ...] | None = None
    #: Sharded tensors: name -> (this rank's chunk, the tensor's global shape, dtype).
    chunks: dict[str, tuple[ChunkEntry, tuple[int, ...], str]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        bin_name = str(data["bin"]["name"])
        blocks = data["bin"].get("blocks")
        return cls(
            rank=int(data["rank"]), step=int(data["step"]), nonce=str(data["nonce"]),
            bin_name=bin_name, bin_size=int(data["bin"]["size"]), bin_checksum=str(data["bin"]["checksum"]),
            tensors={n: TensorEntry(bin_name, int(t["offset"]), int(t["nbytes"]), str(t["dtype"]),
                                    tuple(t["shape"])) for n, t in data["tensors"].items()},
            trees=dict(data["trees"]),
            bin_blocks=None if blocks is None else tuple(str(b) for b in blocks),
            chunks={n: (ChunkEntry(bin_name, int(c["offset"]), int(c["nbytes"]), tuple(c["offsets"]),
                                   tuple(c["sizes"])), tuple(c["shape"]), str(c["dtype"]))
                    for n, c in (data.get("chunks") or {}).items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shard_version": SHARD_VERSION, "rank": self.rank, "step": self.step, "nonce": self.nonce,
            "bin": {"name": self.bin_name, "size": self.bin_size, "checksum": self.bin_checksum,
                    **({"blocks": list(self.bin_blocks)} if self.bin_blocks is not None else {})},
            "tensors": {n: {"offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape)}
                        for n, t in self.tensors.items()},
            "chunks": {n: {"offset": c.offset, "nbytes": c.nbytes, "offsets": list(c.offsets),
                           "sizes": list(c.sizes), "shape": list(shape), "dtype": dtype}
                       for n, (c, shape, dtype) in self.chunks.items()},
            "trees": self.trees,
        }


def read_shard_record(storage: Storage, ckpt: str, manifest: Manifest, rank: int) -> ShardRecord:
    """Read and verify ``rank``'s shard JSON (its state trees) of committed checkpoint directory ``ckpt``."""
    json_name, _ = shard_names(rank)
    jpath = _File(storage, f"{ckpt}/{json_name}")
    raw = _read_verified(jpath, manifest.files[json_name])
    try:
        data = json.loads(raw)
        if data.get("shard_version") not in _KNOWN_SHARD_VERSIONS:
            raise ValueError(f"unknown shard_version {data.get('shard_version')!r}")
        record = ShardRecord.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CorruptCheckpoint(str(jpath), f"malformed shard record ({type(e).__name__}: {e})") from None
    if record.rank != rank or record.step != manifest.step:
        raise CorruptCheckpoint(str(jpath), f"shard is for rank {record.rank} step {record.step}")
    return record


def read_shard_tensors(storage: Storage, ckpt: str, manifest: Manifest, rank: int,
                       keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read and verify ``rank``'s shard .bin, straight into one freshly allocated tensor per entry.

    No intermediate buffer is kept alive afterwards, and the checksum is computed
    over exactly the bytes read. Any inconsistency raises :class:`CorruptCheckpoint`.
    Chunks of sharded tensors come back as tensors of the chunk's shape, under
    :func:`chunk_key`. With ``keep``, only tensors whose name it accepts are returned; the others are
    still read and checksummed (the whole file is verified) but never allocated,
    so exporting a model does not need memory for its optimizer state.
    """
    _, bin_name = shard_names(rank)
    entries = [(n, t) for n, t in manifest.tensors.items() if t.file == bin_name]
    entries += [(chunk_key(n, i), TensorEntry(c.file, c.offset, c.nbytes, e.dtype, c.sizes))
                for n, e in manifest.sharded.items() for i, c in enumerate(e.chunks) if c.file == bin_name]
    entries.sort(key=lambda x: x[1].offset)
    where = _File(storage, f"{ckpt}/{bin_name}")
    ensure_memory(sum(t.nbytes for n, t in entries if keep is None or keep(n)), str(where))
    return _read_tensors(where, manifest.files[bin_name], entries, keep)


def chunk_key(name: str, index: int) -> str:
    """The key :func:`read_shard_tensors` returns chunk ``index`` of sharded tensor ``name`` under."""
    return f"{name}\0{index}"


def ensure_memory(nbytes: int, where: str) -> None:
    """Refuse, as damage, to allocate more tensor bytes than this host has memory available.

    A resealed manifest over a sparse file can declare any size with a valid
    checksum; this keeps such a file from making the reader allocate it.
    """
    available = psutil.virtual_memory().available
    if nbytes > available:
        raise CorruptCheckpoint(where, f"declares {nbytes / 1e9:.1f} GB of tensors to read, more than the "
                                       f"{available / 1e9:.1f} GB of memory available")


@dataclass(frozen=True)
class _File:
    """A file in a storage, named for messages by its full location."""

    storage: Storage
    rel: str

    def __str__(self) -> str:
        return self.storage.describe(self.rel)


def _open(path: _File, entry: FileEntry) -> io.RawIOBase:
    try:
        size = path.storage.size(path.rel)
        if size != entry.size:
            raise CorruptCheckpoint(str(path), f"size {size} bytes, manifest says {entry.size} "
                                               "(truncated or overwritten)")
        return path.storage.open(path.rel)
    except FileNotFoundError:
        raise CorruptCheckpoint(str(path), "file listed in the manifest is missing") from None
    except OSError as e:
        raise CorruptCheckpoint(str(path), f"cannot read ({e.strerror or e})") from None


def _read_into(f: io.RawIOBase, view: memoryview, path: _File) -> None:
    got = 0
    try:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise CorruptCheckpoint(str(path), "file shrank while being read")
            got += n
    except OSError as e:
        raise CorruptCheckpoint(str(path), f"read error ({e.strerror or e})") from None


def _read_verified(path: _File, entry: FileEntry) -> bytes:
    if entry.size > MAX_SHARD_JSON_BYTES:  # before allocating a buffer of the declared size
        raise CorruptCheckpoint(str(path), f"declares {entry.size} bytes, over the {MAX_SHARD_JSON_BYTES}-byte "
                                           "limit for a shard record")
    with _open(path, entry) as f:
        buf = bytearray(entry.size)
        _read_into(f, memoryview(buf), path)
    got = checksum.digest(buf)
    if got != entry.checksum:
        raise CorruptCheckpoint(str(path), f"checksum mismatch (manifest {entry.checksum}, file {got})")
    return bytes(buf)


def _read_tensors(path: _File, entry: FileEntry, entries: list[tuple[str, TensorEntry]],
                  keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    import torch

    from ftrain.checkpoint import codec

    hasher = checksum.Hasher()
    out: dict[str, torch.Tensor] = {}
    scratch = bytearray(_ZEROS)
    skip_buf: memoryview | None = None
    with _open(path, entry) as f:
        pos = 0
        for name, t in entries:
            if t.offset < pos:
                raise CorruptCheckpoint(str(path), f"tensor {name!r} overlaps the previous one")
            gap = memoryview(scratch)[: t.offset - pos] if t.offset - pos <= len(scratch) else None
            if gap is None:
                raise CorruptCheckpoint(str(path), f"unexpected gap before tensor {name!r}")
            _read_into(f, gap, path)
            hasher.update(gap)
            if keep is not None and not keep(name):
                skip_buf = skip_buf or memoryview(bytearray(_SKIP_CHUNK))
                for start in range(0, t.nbytes, _SKIP_CHUNK):
                    chunk = skip_buf[: min(_SKIP_CHUNK, t.nbytes - start)]
                    _read_into(f, chunk, path)
                    hasher.update(chunk)
                pos = t.offset + t.nbytes
                continue
            tensor = torch.empty(t.shape, dtype=codec.dtype_from_name(t.dtype))
            if t.nbytes:
                view = tensor.reshape(-1).view(torch.uint8).numpy().data
                _read_into(f, view, path)
                hasher.update(view)
            out[name] = tensor
            pos = t.offset + t.nbytes
        rest = bytearray(entry.size - pos)
        _read_into(f, memoryview(rest), path)
        hasher.update(rest)
    got = hasher.hexdigest()
    if got != entry.checksum:
        raise CorruptCheckpoint(str(path), f"checksum mismatch (manifest {entry.checksum}, file {got})")
    return out
