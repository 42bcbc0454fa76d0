"""Tied weights (one tensor under two names): stored once, restored tied, exported the way loaders expect.

Covers the codec's ``alias`` values, their bytes on disk, a Session restore into a tied model, validation
with TensorSpec placeholders, ``ftrain ckpt export`` (safetensors and torch), ``load_pretrained`` of the
export, ``ftrain ckpt inspect`` counts, and reading a format-version-1 checkpoint (docs/FORMAT.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ftrain
from ftrain.checkpoint import codec
from ftrain.checkpoint import format as layout
from ftrain.checkpoint.manifest import FORMAT_VERSION, KNOWN_VERSIONS
from ftrain.cli import main as cli
from ftrain.errors import CheckpointError
from ftrain.session.validation import TensorSpec
from helpers import reseal

V, D = 1000, 64  # the embedding is 256 KB: big enough that a second copy shows in the file sizes


class TinyLM(nn.Module):
    """An embedding, one mixing layer and an output head that is the embedding (GPT-2's tie) unless ``tied=False``."""

    def __init__(self, tied: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.emb(idx))))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        idx = torch.randint(0, V, (4, 8))
        loss = nn.functional.cross_entropy(model(idx).reshape(-1, V), idx.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def session(root: Path) -> ftrain.Session:
    return ftrain.Session(overrides={"checkpoint.dir": str(root), "checkpoint.async_save": False,
                                     "checkpoint.retention.keep_last": 0})


def save_model(root: Path, model: nn.Module, step: int = 1, opt: torch.optim.Optimizer | None = None) -> None:
    s = session(root)
    s.register(model=model, **({"optimizer": opt} if opt is not None else {}))
    s.restore()
    s.save(step, blocking=True)
    s.close()


def bin_bytes(root: Path, step: int = 1) -> int:
    return sum(p.stat().st_size for p in (root / layout.step_dirname(step)).glob("*.bin"))


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["ckpt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ codec
def test_same_view_is_an_alias_and_decodes_to_one_object_partial_overlap_is_not():
    t = torch.arange(10.0)
    tree = {"a": t, "b": t[2:5], "c": t[:], "d": t.view(2, 5), "e": t, "opt": {"m": [t]}, "empty": torch.empty(0),
            "empty2": torch.empty(0)}
    enc, tensors = codec.encode(tree, "x")
    enc = json.loads(json.dumps(enc))
    assert enc["a"] == {"$t": "tensor", "ref": "x/a"}
    for k in ("c", "e"):  # the same view (t[:] is another object, but the same storage, offset, shape, strides)
        assert enc[k] == {"$t": "alias", "ref": "x/a"}, k
    assert enc["opt"]["m"][0] == {"$t": "alias", "ref": "x/a"}
    for k in ("b", "d", "empty", "empty2"):  # a slice or another shape overlaps but is not the same tensor
        assert enc[k]["$t"] == "tensor", k
    assert set(tensors) == {"x/a", "x/b", "x/d", "x/empty", "x/empty2"}

    back = codec.decode(enc, lambda name: tensors[name].clone())  # even a lookup that copies: one object per name
    assert back["a"] is back["c"] is back["e"] is back["opt"]["m"][0]
    assert back["b"] is not back["a"] and torch.equal(back["b"], t[2:5]) and torch.equal(back["d"], t.view(2, 5))
    assert torch.equal(back["a"], t)


def test_scopes_are_per_object_and_a_stray_alias_is_refused():
    t = torch.ones(3)
    enc, tensors = codec.encode_objects({"model": {"w": t, "v": t}, "other": {"w": t}}, "replicated")
    assert enc["model"]["v"] == {"$t": "alias", "ref": "replicated/model/w"}
    assert enc["other"]["w"] == {"$t": "tensor", "ref": "replicated/other/w"}  # never an alias into another object
    back = codec.decode_objects(enc, tensors.__getitem__)
    assert back["model"]["w"] is back["model"]["v"] and back["other"]["w"] is not back["model"]["w"]
    with pytest.raises(CheckpointError, match="alias of 'replicated/model/w'"):
        codec.decode({"v": enc["model"]["v"]}, tensors.__getitem__)  # its tensor lives in another object
    with pytest.raises(CheckpointError, match="not a name"):
        codec.decode({"v": {"$t": "alias", "ref": [1]}}, tensors.__getitem__)


def test_placeholders_decode_an_alias_to_the_spec_of_its_tensor():
    model = TinyLM()
    enc, tensors = codec.encode(model.state_dict(), "m")
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    back = codec.decode(json.loads(json.dumps(enc)), specs.__getitem__)
    assert back["lm_head.weight"] is back["emb.weight"] == TensorSpec((V, D), torch.float32)


def test_format_version_4_is_written_and_1_to_3_are_still_known():
    assert FORMAT_VERSION == 4 and KNOWN_VERSIONS == {1, 2, 3, 4}


# ------------------------------------------------------------------ on disk, restore
def test_a_tied_weight_is_stored_once(tmp_path):
    save_model(tmp_path / "tied", TinyLM(tied=True))
    save_model(tmp_path / "untied", TinyLM(tied=False))
    saved = bin_bytes(tmp_path / "untied") - bin_bytes(tmp_path / "tied")
    assert abs(saved - V * D * 4) <= layout.ALIGN, saved
    manifest = json.loads((tmp_path / "tied" / layout.step_dirname(1) / layout.MANIFEST).read_text())["body"]
    assert manifest["format_version"] == 4
    assert "replicated/model/lm_head.weight" not in manifest["tensors"]
    shard = json.loads((tmp_path / "tied" / layout.step_dirname(1) / "shard-00000.json").read_text())
    assert shard["trees"]["replicated"]["model"]["lm_head.weight"] == {"$t": "alias",
                                                                        "ref": "replicated/model/emb.weight"}


def test_restore_into_a_tied_model_keeps_it_tied(tmp_path):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt)
    save_model(tmp_path, model, step=2, opt=opt)

    fresh = TinyLM(seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    s = session(tmp_path)
    s.register(model=fresh, optimizer=fresh_opt)
    assert s.restore() == 2
    s.close()
    assert fresh.lm_head.weight is fresh.emb.weight
    assert fresh.lm_head.weight.data_ptr() == fresh.emb.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(fresh_opt.state_dict()["state"][pid][name], v), (pid, name)
    train(fresh, fresh_opt, 1)  # an optimizer step on the shared parameter keeps it shared
    assert fresh.lm_head.weight is fresh.emb.weight


def test_a_tied_checkpoint_restores_into_an_untied_model_with_both_values(tmp_path):
    model = TinyLM()
    save_model(tmp_path, model)
    fresh = TinyLM(tied=False, seed=3)
    s = session(tmp_path)
    s.register(model=fresh)
    assert s.restore() == 1
    s.close()
    assert torch.equal(fresh.lm_head.weight, model.emb.weight) and torch.equal(fresh.emb.weight, model.emb.weight)


def as_version_1(body):
    """What version 1 wrote: no block checksums (whole files are verified), no sharded table."""
    body.update(format_version=1)
    body.pop("block_bytes")
    body.pop("sharded")
    for entry in body["files"].values():
        entry.pop("blocks", None)


def test_a_version_1_checkpoint_still_reads(tmp_path):
    # What version 1 wrote for a tied model: two tensors of equal value, no aliases.
    model = TinyLM(tied=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.emb.weight)
    save_model(tmp_path, model)
    mpath = tmp_path / layout.step_dirname(1) / layout.MANIFEST
    reseal(mpath, as_version_1)
    shard = json.loads((tmp_path / layout.step_dirname(1) / "shard-00000.json").read_text())
    assert "alias" not in json.dumps(shard["trees"])
    fresh = TinyLM(seed=2)
    s = session(tmp_path)
    s.register(model=fresh)
    assert s.restore() == 1
    s.close()
    assert fresh.lm_head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)
    assert torch.equal(fresh.mix.weight, model.mix.weight)
    reseal(mpath, lambda body: body.update(format_version=4))
    s = session(tmp_path)
    s.register(model=TinyLM())
    assert s.restore() == 0  # an unknown version is skipped as damage, with a message saying so
    s.close()


# ------------------------------------------------------------------ export, load_pretrained, inspect
def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(16).reshape(2, 8))


def test_export_safetensors_writes_one_copy_and_records_the_alias(tmp_path, capsys):
    st_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train(model, opt)
    save_model(tmp_path / "ck", model)
    out = tmp_path / "w.safetensors"
    code, text, err = cli_run(capsys, "export", str(tmp_path / "ck"), str(out))
    assert code == 0, err
    assert "3 tensors" in text and "1 tied tensor name(s)" in err and "lm_head.weight = emb.weight" in err
    got = st_torch.load_file(str(out))
    assert set(got) == {"emb.weight", "mix.weight", "mix.bias"}
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ftrain_aliases"]) == {"lm_head.weight": "emb.weight"}
    assert out.stat().st_size < V * D * 4 * 1.1  # one copy of the embedding, not two

    fresh = TinyLM(seed=9)
    result = fresh.load_state_dict(got, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # re-tied by the model
    assert fresh.lm_head.weight is fresh.emb.weight and torch.equal(logits(fresh), logits(model))

    from ftrain.finetune import load_pretrained

    for tied in (True, False):  # the dropped name counts as loaded, tied model or not
        dst = TinyLM(tied=tied, seed=7)
        report = load_pretrained(dst, out, strict=True, log_report=False)
        assert report.ok and "lm_head.weight" in report.loaded + report.tied and not report.missing
        assert torch.equal(logits(dst), logits(model))
    plain = TinyLM(tied=False)
    plain_out = tmp_path / "untied.safetensors"
    save_model(tmp_path / "ck2", plain)
    code, _, err = cli_run(capsys, "export", str(tmp_path / "ck2"), str(plain_out))
    assert code == 0 and "tied" not in err
    with safe_open(str(plain_out), "pt") as f:
        assert json.loads(f.metadata()["ftrain_aliases"]) == {}


def test_export_torch_keeps_both_names_on_one_tensor(tmp_path, capsys):
    model = TinyLM()
    save_model(tmp_path / "ck", model)
    out = tmp_path / "w.pt"
    code, text, err = cli_run(capsys, "export", str(tmp_path / "ck"), str(out))
    assert code == 0 and "torch.save stores it once" in err, err
    got = torch.load(out, weights_only=True)
    assert set(got) == set(model.state_dict())
    assert got["lm_head.weight"].data_ptr() == got["emb.weight"].data_ptr()
    assert out.stat().st_size < V * D * 4 * 1.1
    fresh = TinyLM(seed=4)
    fresh.load_state_dict(got)
    assert fresh.lm_head.weight is fresh.emb.weight and torch.equal(logits(fresh), logits(model))


def test_inspect_counts_a_tied_parameter_once_and_shows_the_alias(tmp_path, capsys):
    model = TinyLM()
    for p in model.parameters():
        p.requires_grad_(False)  # 4 names (emb.weight, lm_head.weight, mix.*), 3 parameters
    save_model(tmp_path, model)
    doc = json.loads(cli_run(capsys, "inspect", str(tmp_path), "--json")[1])
    assert doc["frozen"] == {"model": 3}
    assert doc["aliases"] == {"model": {"lm_head.weight": "emb.weight"}}
    assert "replicated/model/lm_head.weight" not in {t["name"] for t in doc["tensors"]}
    code, text, _ = cli_run(capsys, "inspect", str(tmp_path))
    assert code == 0 and "frozen       model: 3 frozen parameter(s)" in text
    assert "aliases      model: lm_head.weight = emb.weight (stored once)" in text
