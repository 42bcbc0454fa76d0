"""The storage interface: its contract on the local filesystem and on an in-memory implementation, and the
checkpoint store (discovery, commit, validation, retention, cleanup, reading) running over either."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from ftrain.checkpoint import checksum, codec, format, reader
from ftrain.checkpoint.manifest import TensorEntry
from ftrain.checkpoint.shard import ShardRecord
from ftrain.checkpoint.storage import Entry, LocalStorage, Storage, TooLarge
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CorruptCheckpoint
from ftrain.session import rng


class MemoryStorage:
    """A second :class:`Storage`: a dict of files, directories implied by their paths (as in an object store)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = set()

    def describe(self, path: str = "") -> str:
        return f"mem://{path}"

    def ensure_writable(self) -> None:
        pass

    def list(self, path: str = "") -> list[Entry]:
        prefix = f"{path}/" if path else ""
        out: dict[str, Entry] = {}
        for d in self.dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix):]:
                out[d[len(prefix):]] = Entry(d[len(prefix):], "dir")
        for f, data in self.files.items():
            if f.startswith(prefix) and "/" not in f[len(prefix):]:
                out[f[len(prefix):]] = Entry(f[len(prefix):], "file", len(data))
        return list(out.values())

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def size(self, path: str) -> int:
        if path not in self.files:
            raise FileNotFoundError(path)
        return len(self.files[path])

    def read(self, path: str, limit: int) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        if len(self.files[path]) > limit:
            raise TooLarge(path)
        return self.files[path]

    def open(self, path: str) -> io.RawIOBase:
        return io.BytesIO(self.read(path, 1 << 40))  # type: ignore[return-value]  # readinto is all that is used

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def makedir(self, path: str) -> None:
        self.dirs.add(path)

    def commit(self, src: str, dst: str) -> None:
        assert dst not in self.dirs, "commit must never replace a directory"
        self.dirs = {dst + d[len(src):] if d == src or d.startswith(src + "/") else d for d in self.dirs}
        self.files = {(dst + f[len(src):] if f.startswith(src + "/") else f): v for f, v in self.files.items()}

    def delete(self, path: str) -> None:
        self.dirs = {d for d in self.dirs if not (d == path or d.startswith(path + "/"))}
        self.files = {f: v for f, v in self.files.items() if not (f == path or f.startswith(path + "/"))}


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return LocalStorage(tmp_path / "root") if request.param == "local" else MemoryStorage()


def test_storage_contract(storage: Storage) -> None:
    storage.ensure_writable()
    assert storage.list() == [] and not storage.is_dir("d")
    storage.makedir("d")
    storage.write("d/a", b"one")
    storage.write("d/a", b"two")  # replaced whole
    assert storage.read("d/a", 3) == b"two" and storage.size("d/a") == 3
    with pytest.raises(TooLarge):
        storage.read("d/a", 2)
    with storage.open("d/a") as f:
        assert checksum.stream_digest(f) == (3, checksum.digest(b"two"))
    with pytest.raises(FileNotFoundError):
        storage.size("d/missing")
    storage.commit("d", "e")
    assert {e.name for e in storage.list()} == {"e"} and storage.read("e/a", 3) == b"two"
    assert [(e.name, e.kind, e.size) for e in storage.list("e")] == [("a", "file", 3)]
    storage.delete("e")
    storage.delete("e")  # gone already: not an error
    assert storage.list() == []


def write_checkpoint(storage: Storage, step: int, value: float, nonce: str = "n0nce") -> str:
    """What the shard writers leave in a temp dir: one rank's .bin and the .json record naming it."""
    tmp = format.tmp_dirname(step, nonce)
    storage.makedir(tmp)
    weight = torch.full((2, 3), value)
    tree, tensors = codec.encode({"model": {"w": weight}}, format.REPLICATED)
    own, own_tensors = codec.encode({"rng": rng.capture()}, format.rank_key(0))  # every rank's tree holds one
    json_name, bin_name = format.shard_names(0)
    data, entries = b"", {}
    for name, t in {**tensors, **own_tensors}.items():
        data += bytes(format.align_up(len(data)) - len(data))
        raw = codec.tensor_bytes(t).tobytes()
        entries[name] = TensorEntry(bin_name, len(data), len(raw), codec.dtype_name(t.dtype), tuple(t.shape))
        data += raw
    storage.write(f"{tmp}/{bin_name}", data)
    record = ShardRecord(0, step, nonce, bin_name, len(data), checksum.digest(data), entries,
                         {format.REPLICATED: tree, format.rank_key(0): own})
    storage.write(f"{tmp}/{json_name}", json.dumps(record.to_json()).encode())
    return tmp


def commit(store: CheckpointStore, step: int, value: float, best: list[int] | None = None, keep: int = 2) -> None:
    tmp = write_checkpoint(store.storage, step, value)
    store.commit(tmp, step=step, world_size=1, nonce="n0nce", meta={"replicated": ["model"]})
    store.retain(step, keep, best or [])


def test_store_over_any_storage(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "root", storage)
    store.ensure_writable()
    for step in (10, 20, 30):
        commit(store, step, float(step), best=[10])
    # keep_last=2 keeps 20 and 30; 10 is protected as the best one, and `best` names it.
    assert store.steps() == [10, 20, 30]
    assert store.latest_hint() == format.step_dirname(30) and store.best_hint() == format.step_dirname(10)
    commit(store, 40, 40.0, best=[])
    assert store.steps() == [30, 40] and store.best_hint() is None
    assert all(info.valid for info in store.infos())
    manifest, objects = reader.load(store, "latest", name="model")
    assert manifest.step == 40 and torch.equal(objects["model"]["w"], torch.full((2, 3), 40.0))

    # Damage is caught through the interface too, and `latest` falls back.
    bin_path = f"{format.step_dirname(40)}/{format.shard_names(0)[1]}"
    data = bytearray(storage.read(bin_path, 1 << 20))
    data[0] ^= 0xFF
    storage.write(bin_path, bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        store.validate(40)
    assert reader.load(store, "latest", name="model")[0].step == 30

    # Leftovers of interrupted saves are removed; a checkpoint moved aside by an interrupted replace comes back.
    write_checkpoint(storage, 50, 50.0, nonce="dead")
    storage.commit(format.step_dirname(30), f"{format.REPLACED_PREFIX}{format.step_dirname(30)}-abcd")
    removed = store.cleanup_temps()
    assert removed == [format.tmp_dirname(50, "dead")]
    assert store.steps() == [30, 40] and store.validate(30).step == 30
