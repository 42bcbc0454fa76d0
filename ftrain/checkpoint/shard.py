"""One rank's share of a checkpoint: ``shard-RRRRR.bin`` (tensor bytes) and ``shard-RRRRR.json``.

The JSON holds the rank's state trees (see ``codec``), the index of its tensors
in the .bin file, and the .bin file's size and checksum. It is renamed into place
only after the .bin file is fsynced, so its appearance tells the committing rank
that this shard is durable; the commit protocol relies on nothing else.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftrain import faults
from ftrain.checkpoint import checksum, codec
from ftrain.checkpoint.layout import align_up, atomic_write, shard_names, write_all
from ftrain.checkpoint.manifest import TensorEntry

SHARD_VERSION = 1
_ZEROS = bytes(64)


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(
            rank=int(data["rank"]), step=int(data["step"]), nonce=str(data["nonce"]),
            bin_name=str(data["bin"]["name"]), bin_size=int(data["bin"]["size"]),
            bin_checksum=str(data["bin"]["checksum"]),
            tensors={n: TensorEntry(str(data["bin"]["name"]), int(t["offset"]), int(t["nbytes"]), str(t["dtype"]),
                                    tuple(t["shape"])) for n, t in data["tensors"].items()},
            trees=dict(data["trees"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shard_version": SHARD_VERSION, "rank": self.rank, "step": self.step, "nonce": self.nonce,
            "bin": {"name": self.bin_name, "size": self.bin_size, "checksum": self.bin_checksum},
            "tensors": {n: {"offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape)}
                        for n, t in self.tensors.items()},
            "trees": self.trees,
        }


def write_shard(tmpdir: Path, *, rank: int, step: int, nonce: str, trees: dict[str, Any]) -> ShardRecord:
    """Encode ``trees`` and write this rank's two shard files durably into ``tmpdir``.

    Tensor names start with the tree's key, so keys must be unique across the
    ranks of one checkpoint (the session uses ``replicated`` and ``rank-RRRRR``).
    Raises :class:`CheckpointError` for unstorable values before touching the disk.
    """
    json_name, bin_name = shard_names(rank)
    encoded: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, tree in trees.items():
        encoded[key], t = codec.encode(tree, key)
        tensors.update(t)

    index: dict[str, TensorEntry] = {}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        index[name] = TensorEntry(bin_name, offset, nbytes, codec.dtype_name(t.dtype), tuple(t.shape))
        offset = align_up(offset + nbytes)
    total = offset

    hasher = checksum.Hasher()
    fd = os.open(tmpdir / bin_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        for name, t in tensors.items():
            entry = index[name]
            if entry.offset > pos:
                pad = _ZEROS[: entry.offset - pos]
                hasher.update(pad)
                write_all(fd, pad)
            data = codec.tensor_bytes(t.cpu())
            hasher.update(data)
            write_all(fd, data)
            pos = entry.offset + entry.nbytes
            if pos * 2 >= total > 0:
                faults.point("save.mid_write", step=step, rank=rank)
        if total > pos:
            pad = _ZEROS[: total - pos]
            hasher.update(pad)
            write_all(fd, pad)
        os.fsync(fd)
    finally:
        os.close(fd)

    record = ShardRecord(rank=rank, step=step, nonce=nonce, bin_name=bin_name, bin_size=total,
                         bin_checksum=hasher.hexdigest(), tensors=index, trees=encoded)
    faults.point("save.shard_bin_written", step=step, rank=rank)
    # No directory fsync here: the committing rank fsyncs the directory once for all shards.
    atomic_write(tmpdir / json_name, json.dumps(record.to_json()).encode(), fsync_parent=False)
    return record


def tensor_from_buffer(buf: bytearray, entry: TensorEntry) -> torch.Tensor:
    """View a stored tensor inside the buffer holding its file (no copy)."""
    dtype = codec.dtype_from_name(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    return raw.view(dtype).reshape(entry.shape)
