"""Unit tests of the on-disk encoding: state trees without pickle, manifests, names."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ftrain.checkpoint import codec
from ftrain.checkpoint import format as layout
from ftrain.checkpoint.manifest import FileEntry, Manifest, TensorEntry, parse
from ftrain.errors import CheckpointError, CorruptCheckpoint


def roundtrip(tree):
    enc, tensors = codec.encode(tree, "x")
    enc = json.loads(json.dumps(enc))  # what really happens: it goes through JSON
    return codec.decode(enc, lambda name: tensors[name].clone()), tensors


def test_optimizer_state_roundtrips_exactly():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    back, _ = roundtrip(sd)
    assert set(back["state"]) == {0, 1}  # int keys survive
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples survive
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    for k in sd["state"]:
        for name, v in sd["state"][k].items():
            assert torch.equal(back["state"][k][name], v)
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(back)


def test_awkward_values_roundtrip():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tree = {
        "bf16": torch.randn(5).to(torch.bfloat16), "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7), "noncontig": t.t(), "bool": torch.tensor([True, False]),
        "floats": [math.inf, -math.inf, 1e-300], "nested": {"a": [1, (2, "3")], 4: None},
        "dtype": torch.float16, "size": torch.Size([2, 3]), "$t": "user key that looks like a tag",
    }
    back, tensors = roundtrip(tree)
    for key in ("bf16", "scalar", "empty", "noncontig", "bool"):
        assert back[key].dtype == tree[key].dtype and torch.equal(back[key], tree[key]), key
    assert back["floats"] == tree["floats"] and back["nested"] == tree["nested"]
    assert back["dtype"] is torch.float16 and back["size"] == torch.Size([2, 3]) and back["$t"] == tree["$t"]
    assert math.isnan(roundtrip({"n": math.nan})[0]["n"])
    assert "x/noncontig" in tensors


def test_unstorable_value_is_refused_with_its_path():
    with pytest.raises(CheckpointError, match=r"x/inner/fn.*no pickle"):
        codec.encode({"inner": {"fn": lambda: 0}}, "x")


def test_unknown_dtype_is_refused():
    with pytest.raises(CheckpointError, match="unknown tensor dtype"):
        codec.dtype_from_name("Tensor")


def test_step_names_sort_like_steps():
    steps = [0, 9, 10, 99, 100, 123456789]
    names = [layout.step_dirname(s) for s in steps]
    assert sorted(names) == names
    assert [layout.parse_step_dirname(n) for n in names] == steps
    assert layout.parse_step_dirname("step-12") is None
    assert layout.parse_step_dirname(".tmp-step-000000000010-ab") is None


def _manifest() -> Manifest:
    files = {f"shard-{r:05d}.{ext}": FileEntry(128, "00" * 16, r) for r in (0, 1) for ext in ("json", "bin")}
    return Manifest(step=7, world_size=2, files=files,
                    tensors={"w": TensorEntry("shard-00001.bin", 64, 64, "float32", (4, 4))}, ftrain_version="t")


def test_manifest_roundtrip():
    m = parse(_manifest().to_bytes(), "m")
    assert m.step == 7 and m.world_size == 2 and m.tensors["w"].shape == (4, 4)
    assert m.files["shard-00001.bin"] == FileEntry(128, "00" * 16, 1)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.replace(b'"step": 7', b'"step": 8'), "manifest checksum mismatch"),
    (lambda d: d[: len(d) // 2], "not valid JSON"),
    (lambda d: b"\x00\xff garbage", "not valid JSON"),
    (lambda d: b"[]", "no 'body'"),
])
def test_manifest_damage_is_detected(mutate, reason):
    with pytest.raises(CorruptCheckpoint, match=reason):
        parse(mutate(_manifest().to_bytes()), "m")


def test_unknown_format_version_is_refused():
    m = _manifest()
    m.format_version = 99
    with pytest.raises(CorruptCheckpoint, match="format version 99 is not known"):
        parse(m.to_bytes(), "m")


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.tensors.update(w=TensorEntry("shard-00001.bin", 128, 64, "float32", (4, 4))), "outside"),
    (lambda m: m.tensors.update(w=TensorEntry("shard-00001.bin", 32, 64, "float32", (4, 4))), "misaligned"),
    (lambda m: m.tensors.update(w=TensorEntry("shard-00001.bin", 0, 0, "float32", (2**40, 2**20))), "bytes"),
    (lambda m: m.tensors.update(w=TensorEntry("shard-00001.bin", 0, 64, "_dynamo", (4, 4))), "unknown tensor dtype"),
    (lambda m: m.tensors.update(w=TensorEntry("shard-00001.json", 0, 64, "float32", (4, 4))), "not a listed .bin"),
    (lambda m: m.files.update({"../../etc/hostname": FileEntry(1, "00", 0)}), "does not match world_size"),
    (lambda m: m.files.pop("shard-00000.json"), "does not match world_size"),
    (lambda m: m.files.update({"shard-00000.bin": FileEntry(128, "00", 1)}), "bad entry"),
])
def test_hostile_manifest_is_refused(edit, reason):
    """A manifest whose checksum is right but whose content is impossible or dangerous."""
    m = _manifest()
    edit(m)
    with pytest.raises(CorruptCheckpoint, match=reason):
        parse(m.to_bytes(), "m")
