"""Resharding reads without processes: chunks of a global tensor written to real files, read back into other boxes
through the planner (``readplan``) and the block-verifying reader (``direct``); and manifests whose chunks lie."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.checkpoint import checksum, readplan
from ftrain.checkpoint import format as fmt
from ftrain.checkpoint.direct import DirectReader
from ftrain.checkpoint.manifest import ChunkEntry, FileEntry, Manifest, ShardedEntry, parse
from ftrain.checkpoint.readplan import Target
from ftrain.checkpoint.storage import LocalStorage
from ftrain.errors import CorruptCheckpoint


def splits(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)`` (FSDP2's split: ceil-sized, trailing ones may be empty)."""
    size = -(-n // parts)
    return [(min(n, i * size), max(0, min(n, (i + 1) * size) - min(n, i * size))) for i in range(parts)]


def boxes(shape: tuple[int, ...], parts: int, dim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    out = []
    for lo, size in splits(shape[dim], parts):
        offsets = tuple(lo if d == dim else 0 for d in range(len(shape)))
        sizes = tuple(size if d == dim else shape[d] for d in range(len(shape)))
        out.append((offsets, sizes))
    return out


def write_chunks(root: Path, full: torch.Tensor, saved: list[tuple[tuple[int, ...], tuple[int, ...]]],
                 pad: int = 0) -> tuple[dict[str, FileEntry], list[ChunkEntry]]:
    """One .bin per saving rank, the chunk after ``pad`` bytes of other data, with block checksums."""
    files, chunks = {}, []
    for rank, (offsets, sizes) in enumerate(saved):
        part = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].contiguous()
        data = bytes(pad) + part.numpy().tobytes()
        name = fmt.shard_names(rank)[1]
        (root / name).write_bytes(data)
        h = checksum.BlockHasher()
        h.update(data)
        whole, blocks = h.finish()
        files[name] = FileEntry(len(data), whole, rank, tuple(blocks))
        chunks.append(ChunkEntry(name, pad, part.numel() * part.element_size(), offsets, sizes))
    return files, chunks


def restore(root: Path, files: dict[str, FileEntry], chunks: list[ChunkEntry], shape: tuple[int, ...],
            wanted: list[tuple[tuple[int, ...], tuple[int, ...]]], live: bool) -> list[torch.Tensor]:
    targets = [Target("t", torch.full(sizes, -1.0), offsets, live) for offsets, sizes in wanted]
    pieces = [p for t in targets for p in readplan.sharded(t, chunks, 4)]
    assert all(readplan.covered(t, pieces) for t in targets)
    reader = DirectReader(LocalStorage(root.parent), root.name, files)
    try:
        done = reader.verify(pieces)
        reader.fill([p for p in pieces if p not in done])
    finally:
        reader.close()
    return [t.tensor for t in targets]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 9), old=st.integers(1, 5), new=st.integers(1, 5),
       old_dim=st.integers(0, 1), new_dim=st.integers(0, 1), live=st.booleans())
def test_any_split_reads_back_into_any_other_split(tmp_path_factory, rows, cols, old, new, old_dim, new_dim, live):
    root = tmp_path_factory.mktemp("ck") / "step"
    root.mkdir()
    full = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    files, chunks = write_chunks(root, full, boxes(full.shape, old, old_dim), pad=64)
    wanted = boxes(tuple(full.shape), new, new_dim)
    for (offsets, sizes), got in zip(wanted, restore(root, files, chunks, tuple(full.shape), wanted, live)):
        assert torch.equal(got, full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])


def test_row_sharding_reads_every_piece_straight_into_its_target(tmp_path):
    full = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    _, chunks = write_chunks(tmp_path, full, boxes((64, 8), 4, 0))
    targets = [Target("t", torch.empty(s), o, True) for o, s in boxes((64, 8), 2, 0)]
    pieces = [p for t in targets for p in readplan.sharded(t, chunks, 4)]
    assert len(pieces) == 4 and all(p.direct for p in pieces)  # 4 -> 2 ranks: two whole chunks each, no copy


def test_a_flipped_byte_in_a_chunk_is_found_by_the_rank_that_reads_it(tmp_path):
    full = torch.randn(1 << 20)  # 4 MiB: two chunks of 2 MiB, each in its own file
    files, chunks = write_chunks(tmp_path, full, boxes((1 << 20,), 2, 0))
    with open(tmp_path / chunks[1].file, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptCheckpoint, match=r"checksum mismatch in bytes 0\.\.2097152 \(block 0"):
        restore(tmp_path, files, chunks, (1 << 20,), [((0,), (1 << 20,))], live=False)
    # A rank whose new shard lies wholly in the intact file never reads the damaged one.
    (got,) = restore(tmp_path, files, chunks, (1 << 20,), [((0,), (1 << 19,))], live=False)
    assert torch.equal(got, full[: 1 << 19])


def test_blocks_merge_touching_ranges():
    t = Target("t", torch.empty(1), (0,), False)
    b = checksum.BLOCK_BYTES
    pieces = [readplan.Piece("f", 0, 10, t, True), readplan.Piece("f", b - 5, 10, t, True),
              readplan.Piece("f", 5 * b, 1, t, True)]
    assert readplan.blocks(pieces) == [(0, 2), (5, 6)]


# ------------------------------------------------------------------ hostile manifests
def manifest_with(chunks: list[dict], shape: list[int], size: int = 1 << 12) -> bytes:
    m = Manifest(step=1, world_size=1, files={"shard-00000.bin": FileEntry(size, "0" * 32, 0, ("0" * 32,)),
                                             "shard-00000.json": FileEntry(10, "0" * 32, 0)},
                 tensors={}, sharded={"replicated/m/w": ShardedEntry(tuple(shape), "float32", tuple(
                     ChunkEntry("shard-00000.bin", c["offset"], c["nbytes"], tuple(c["offsets"]), tuple(c["sizes"]))
                     for c in chunks))})
    return m.to_bytes()


def chunk(offset: int, offsets: list[int], sizes: list[int]) -> dict:
    return {"offset": offset, "offsets": offsets, "sizes": sizes, "nbytes": 4 * math.prod(sizes)}


@pytest.mark.parametrize("chunks, shape, why", [
    ([chunk(0, [0, 0], [3, 4]), chunk(64, [2, 0], [3, 4])], [6, 4], "overlap"),  # volumes add up: a gap too
    ([chunk(0, [0, 0], [2, 4]), chunk(64, [3, 0], [3, 4])], [6, 4], "do not cover"),
    ([chunk(0, [0, 0], [4, 4]), chunk(64, [4, 0], [4, 4])], [6, 4], "outside its shape"),
    ([{**chunk(0, [0, 0], [6, 4]), "nbytes": 8}], [6, 4], "is not 8 bytes"),
    ([chunk(4000, [0, 0], [6, 4])], [6, 4], "outside shard-00000.bin"),
    ([chunk(8, [0, 0], [6, 4])], [6, 4], "misaligned"),
    ([chunk(0, [0], [24])], [6, 4], "outside its shape"),
])
def test_chunks_that_do_not_tile_their_tensor_are_damage(chunks, shape, why):
    with pytest.raises(CorruptCheckpoint, match=why):
        parse(manifest_with(chunks, shape), "m")


def test_a_block_list_of_the_wrong_length_is_damage():
    data = json.loads(manifest_with([chunk(0, [0, 0], [6, 4])], [6, 4], size=checksum.BLOCK_BYTES + 1))
    body = data["body"]
    assert len(body["files"]["shard-00000.bin"]["blocks"]) == 1  # 2 needed for BLOCK_BYTES + 1 bytes
    data["body_xxh3_128"] = checksum.digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(CorruptCheckpoint, match="1 block checksums for 4194305 bytes"):
        parse(json.dumps(data).encode(), "m")


def test_tiled_chunks_parse():
    m = parse(manifest_with([chunk(0, [0, 0], [3, 4]), chunk(64, [3, 0], [3, 4])], [6, 4]), "m")
    assert [c.offsets for c in m.sharded["replicated/m/w"].chunks] == [(0, 0), (3, 0)]
