"""Checkpoint files between two disks' leaders over a gloo group (session/peers.py), in two real processes: both
directions at once, a file of several blocks, a damaged copy refused, a missing one reported, nothing partial."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ftrain.checkpoint import checksum

from helpers import child_env

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from ftrain.checkpoint import checksum
from ftrain.checkpoint.manifest import FileEntry
from ftrain.checkpoint.storage import LocalStorage
from ftrain.session.peers import FileMove, Peers

rank, store_path, root, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
group = dist.new_group(ranks=[0, 1], backend="gloo")
local = LocalStorage(root)
entries = {n: FileEntry(e["size"], e["checksum"], 0, tuple(e["blocks"]) if e["blocks"] else None)
           for n, e in spec["entries"].items()}
mine, theirs = spec["files"][rank], spec["files"][1 - rank]
failed = Peers(group).swap(local, send=[FileMove(n, entries[n]) for n in mine], to=1 - rank,
                           receive=[FileMove(n, entries[n]) for n in theirs], source=1 - rank)
print(json.dumps(sorted(failed)))
dist.destroy_process_group()
"""


def entry(data: bytes) -> dict[str, object]:
    """A manifest's file entry for ``data`` (block checksums for the large one, as for a ``.bin``)."""
    hasher = checksum.BlockHasher()
    hasher.update(data)
    digest, blocks = hasher.finish()
    return {"size": len(data), "checksum": digest, "blocks": blocks if len(data) > 1000 else None}


def test_files_cross_both_ways_and_a_damaged_or_missing_copy_is_refused(tmp_path: Path) -> None:
    disks = [tmp_path / "a", tmp_path / "b"]
    for d in disks:
        d.mkdir()
    big = os.urandom((4 << 20) * 2 + 12345)  # three blocks: several messages, each block checked as it lands
    good, bad, gone, back = b"good" * 10, b"the manifest says this", b"nothing", b"from b"
    (disks[0] / "big.bin").write_bytes(big)
    (disks[0] / "good.json").write_bytes(good)
    (disks[0] / "bad.json").write_bytes(b"the manifest says THIS")  # same size, other bytes: a damaged copy
    (disks[1] / "back.json").write_bytes(back)
    spec = {"entries": {"big.bin": entry(big), "good.json": entry(good), "bad.json": entry(bad),
                        "gone.json": entry(gone), "back.json": entry(back)},
            "files": [["big.bin", "good.json", "bad.json", "gone.json"], ["back.json"]]}
    store = tempfile.mktemp(dir=tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), store, str(disks[r]), json.dumps(spec)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert json.loads(outs[1][0]) == ["bad.json", "gone.json"]
    assert json.loads(outs[0][0]) == []
    assert (disks[1] / "big.bin").read_bytes() == big and (disks[1] / "good.json").read_bytes() == good
    assert (disks[0] / "back.json").read_bytes() == back
    assert sorted(p.name for p in disks[1].iterdir()) == ["back.json", "big.bin", "good.json"]  # nothing partial
