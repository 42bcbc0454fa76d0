"""Unit tests of ftrain.finetune: pretrained-weight loading, freezing, parameter groups (one process, tiny models)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ftrain
from ftrain.errors import CheckpointError, CorruptCheckpoint, FtrainError, StateMismatch
from ftrain.finetune import LoadReport, freeze, frozen_names, load_pretrained, param_groups, unfreeze

from helpers import assert_same_tensors


class Net(nn.Module):
    """A backbone and a classification head, the usual fine-tuning shape."""

    def __init__(self, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(x)))


class Wrapper(nn.Module):
    """Names its submodule ``module`` like DDP does, so its state-dict keys start with ``module.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 20).reshape(5, 4))


def trained_source() -> Net:
    """A "pretrained" model whose values differ from a fresh Net(seed=0), including BatchNorm statistics."""
    src = Net(seed=1)
    src.train()
    src(torch.randn(16, 4))
    return src


# ------------------------------------------------------------- load: formats
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_ddp_prefixed_file_loads_into_plain_model(tmp_path: Path, fmt: str) -> None:
    src = trained_source()
    ddp_sd = {f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(ddp_sd, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": ddp_sd, "epoch": 7, "arch": "net"} if fmt == "pt-wrapped" else ddp_sd, path)
    dst = Net(seed=0)
    assert not torch.equal(outputs(dst), outputs(src))
    report = load_pretrained(dst, path, strict=True)
    assert report.ok and report.stripped_prefix == "module."
    assert report.renamed == len(ddp_sd) and len(report.loaded) == len(ddp_sd)
    assert torch.equal(outputs(dst), outputs(src))
    assert_same_tensors(state(dst), state(src))


def test_compiled_and_ddp_prefixes_both_stripped() -> None:
    src = trained_source()
    sd = {f"_orig_mod.module.{k}": v for k, v in src.state_dict().items()}
    dst = Net()
    report = load_pretrained(dst, sd, strict=True)
    assert report.stripped_prefix == "_orig_mod.module."
    assert_same_tensors(state(dst), state(src))


def test_model_whose_own_keys_start_with_module_is_not_stripped() -> None:
    src = Wrapper(trained_source())
    dst = Wrapper(Net())
    report = load_pretrained(dst, src.state_dict(), strict=True)
    assert report.stripped_prefix == "" and report.renamed == 0
    assert_same_tensors(state(dst), state(src))


def test_plain_mapping_source_named_in_report() -> None:
    report = load_pretrained(Net(), trained_source().state_dict())
    assert report.source.startswith("<mapping") and report.ok


def test_pt_with_custom_class_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # what an attacker's pickle does: call anything on load
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(3), "payload": Evil()}, path)
    before = state(dst := Net())
    with pytest.raises(FtrainError) as err:
        load_pretrained(dst, path)
    msg = str(err.value)
    assert str(path) in msg and "code execution" in msg and "safetensors" in msg and "\n" not in msg
    assert not isinstance(err.value, StateMismatch)
    assert not marker.exists()
    assert_same_tensors(state(dst), before)


def test_corrupt_and_unknown_files(tmp_path: Path) -> None:
    for name in ("bad.pt", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"garbage, not weights")
        with pytest.raises(CorruptCheckpoint, match="bad"):
            load_pretrained(Net(), tmp_path / name)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(FtrainError, match=r"w\.npz.*safetensors"):
        load_pretrained(Net(), tmp_path / "w.npz")
    with pytest.raises(FtrainError, match="do not exist"):
        load_pretrained(Net(), tmp_path / "absent.safetensors")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FtrainError, match="not an ftrain checkpoint"):
        load_pretrained(Net(), tmp_path / "plain")
    with pytest.raises(FtrainError, match="step"):
        load_pretrained(Net(), Net().state_dict(), step=3)


def test_ambiguous_wrapped_pt_is_refused(tmp_path: Path) -> None:
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 4)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    with pytest.raises(FtrainError, match="model.*optimizer"):
        load_pretrained(Net(), path)
    torch.save({"model": net.state_dict(), "step": 3}, path)
    assert load_pretrained(Net(seed=5), path).ok


# -------------------------------------------------------- load: key mapping
def test_key_map_prefix_mapping_longest_wins_and_callable() -> None:
    src = trained_source()
    sd = {k.replace("backbone.", "encoder.").replace("head.", "classifier."): v for k, v in src.state_dict().items()}
    sd["encoder.extra.bias"] = torch.zeros(2)
    dst = Net()
    report = load_pretrained(dst, sd, key_map={"encoder.": "backbone.", "classifier.": "head.",
                                               "encoder.extra.": None}, strict=True)
    assert report.dropped == ["encoder.extra.bias"]
    assert report.renamed == 6  # backbone 4 + head 2; norm.* kept its name
    assert_same_tensors(state(dst), state(src))

    dst2 = Net()
    report = load_pretrained(dst2, sd, key_map=lambda k: None if ".extra." in k else
                             k.replace("encoder.", "backbone.").replace("classifier.", "head."), strict=True)
    assert report.ok
    assert_same_tensors(state(dst2), state(src))


def test_add_prefix_and_collision() -> None:
    src = trained_source()
    backbone_only = src.backbone.state_dict()
    dst = Net()
    report = load_pretrained(dst, backbone_only, add_prefix="backbone.")
    assert set(report.loaded) == {f"backbone.{k}" for k in backbone_only}
    assert torch.equal(dst.backbone[0].weight, src.backbone[0].weight)
    with pytest.raises(FtrainError, match="both"):
        load_pretrained(Net(), {"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)}, key_map={"a.": "b."})


# ------------------------------------------------------ load: new head etc.
def test_new_head_strict_raises_and_changes_nothing() -> None:
    src = trained_source()  # 3 classes
    dst = Net(classes=5, seed=2)
    before = state(dst)
    with pytest.raises(StateMismatch) as err:
        load_pretrained(dst, src.state_dict(), strict=True)
    msg = str(err.value)
    assert "head.weight" in msg and "[3, 8]" in msg and "[5, 8]" in msg and "skip_mismatched" in msg
    assert_same_tensors(state(dst), before)
    with pytest.raises(StateMismatch, match="head.bias"):  # non-strict still refuses shape changes by default
        load_pretrained(dst, src.state_dict())
    assert_same_tensors(state(dst), before)


def test_new_head_skip_mismatched_keeps_head_loads_backbone() -> None:
    src = trained_source()
    dst = Net(classes=5, seed=2)
    head_w, head_b = dst.head.weight.detach().clone(), dst.head.bias.detach().clone()
    report = load_pretrained(dst, src.state_dict(), strict=True, skip_mismatched=True)
    assert [k for k, *_ in report.mismatched] == ["head.weight", "head.bias"]
    assert report.mismatched[0] == ("head.weight", (3, 8), (5, 8))
    assert not report.ok and not report.missing and not report.unexpected
    assert torch.equal(dst.head.weight, head_w) and torch.equal(dst.head.bias, head_b)
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(dst.state_dict()[k], v), k


def test_report_lists_missing_unexpected_mismatched(caplog: pytest.LogCaptureFixture) -> None:
    sd = trained_source().state_dict()
    del sd["backbone.0.bias"]
    sd["head.weight"] = torch.zeros(7, 8)
    sd["aux.weight"] = torch.zeros(2)
    sd["aux.note"] = "not a tensor"
    with caplog.at_level(logging.INFO, logger="ftrain"):
        report = load_pretrained(Net(), sd, skip_mismatched=True)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["backbone.0.bias"]
    assert report.unexpected == ["aux.weight", "aux.note"]
    assert report.mismatched == [("head.weight", (7, 8), (3, 8))]
    text = str(report)
    assert "1 missing, 2 unexpected, 1 mismatched" in text and "backbone.0.bias" in text and "[7, 8]" in text
    assert any(r.levelno == logging.WARNING and "aux.note" in r.getMessage() for r in caplog.records)
    with pytest.raises(StateMismatch) as err:
        load_pretrained(Net(), sd, strict=True, skip_mismatched=True)
    assert "1 missing (backbone.0.bias)" in str(err.value) and "aux.weight" in str(err.value)


def test_report_str_truncates_long_lists() -> None:
    report = LoadReport(source="x", missing=[f"k{i}" for i in range(25)])
    lines = str(report).splitlines()
    assert "... and 15 more" in lines[-1] and len(lines) == 1 + 1 + 10 + 1


def test_non_tensor_for_tensor_key_is_mismatched() -> None:
    sd = trained_source().state_dict()
    sd["head.bias"] = [1.0, 2.0, 3.0]
    report = load_pretrained(Net(), sd, skip_mismatched=True, log_report=False)
    assert report.mismatched == [("head.bias", None, (3,))]


def test_extra_state_passes_through() -> None:
    class WithExtra(nn.Linear):
        def __init__(self) -> None:
            super().__init__(2, 2)
            self.tag = "fresh"

        def get_extra_state(self) -> dict:
            return {"tag": self.tag}

        def set_extra_state(self, st: dict) -> None:
            self.tag = st["tag"]

    src, dst = WithExtra(), WithExtra()
    src.tag = "pretrained"
    report = load_pretrained(dst, src.state_dict(), strict=True)
    assert "_extra_state" in report.loaded and dst.tag == "pretrained"
    report = load_pretrained(nn.Linear(2, 2), src.state_dict(), log_report=False)
    assert report.unexpected == ["_extra_state"]


def test_dtype_cast_identity_and_requires_grad_preserved() -> None:
    src = trained_source()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    dst = Net()
    dst.backbone[0].weight.requires_grad_(False)
    params = {n: p for n, p in dst.named_parameters()}
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    report = load_pretrained(dst, half, strict=True)
    assert ("head.weight", torch.float16, torch.float32) in report.cast
    assert "norm.num_batches_tracked" not in [k for k, *_ in report.cast]
    assert dst.head.weight.dtype == torch.float32
    assert torch.equal(dst.head.weight, src.head.weight.half().float())
    for n, p in dst.named_parameters():
        assert p is params[n]
    assert not dst.backbone[0].weight.requires_grad and dst.head.weight.requires_grad
    assert opt.param_groups[0]["params"][-1] is dst.head.bias
    assert "float16 -> float32" in str(report)


def test_tied_weight_stored_once_counts_as_loaded(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.embed.weight

    src = Tied()
    nn.init.normal_(src.embed.weight)
    path = tmp_path / "tied.safetensors"
    save_file({"embed.weight": src.embed.weight.detach()}, str(path))  # savers keep one name of a shared tensor
    dst = Tied()
    report = load_pretrained(dst, path, strict=True)
    assert report.tied == ["out.weight"] and report.ok
    assert torch.equal(dst.out.weight, src.embed.weight) and dst.out.weight is dst.embed.weight


# ------------------------------------------------------- load: checkpoints
def test_load_from_ftrain_checkpoint_root_and_step_dir(tmp_path: Path) -> None:
    src = trained_source()
    session = ftrain.Session(overrides={"checkpoint.dir": str(tmp_path / "ck"), "checkpoint.async_save": False})
    session.register(model=src, counters=ftrain.Counters(seen=3))
    assert session.restore() == 0
    session.save(5, blocking=True)
    session.close()
    step_dir = tmp_path / "ck" / "step-000000000005"
    assert step_dir.is_dir()
    for source, step in ((tmp_path / "ck", None), (tmp_path / "ck", 5), (tmp_path / "ck", "latest"), (step_dir, None)):
        dst = Net(seed=4)
        report = load_pretrained(dst, source, step=step, strict=True)
        assert report.ok and str(step_dir) in report.source
        assert_same_tensors(state(dst), state(src))
    with pytest.raises(CheckpointError, match="no checkpoint of step 6"):
        load_pretrained(Net(), tmp_path / "ck", step=6)
    with pytest.raises(CheckpointError, match="per-rank|no object"):
        load_pretrained(Net(), tmp_path / "ck", object_name="optimizer")
    report = load_pretrained(Net(), tmp_path / "ck", object_name="counters", log_report=False)
    assert report.unexpected == list(ftrain.Counters(seen=3).state_dict())
    assert report.missing == list(Net().state_dict()) and not report.loaded
    assert "nothing loaded" in str(report) and "key_map" in str(report)


# --------------------------------------------------------------- freezing
def test_freeze_patterns_and_modules() -> None:
    net = Net()
    assert freeze(net, "backbone.*") == ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight",
                                         "backbone.2.bias"]
    assert frozen_names(net) == sorted(["backbone.0.weight", "backbone.0.bias", "backbone.2.weight",
                                        "backbone.2.bias"])
    assert freeze(net, net.norm, "*.bias") == ["backbone.0.bias", "backbone.2.bias", "norm.weight", "norm.bias",
                                               "head.bias"]
    assert unfreeze(net, net.backbone[2]) == ["backbone.2.weight", "backbone.2.bias"]
    assert frozen_names(net) == ["backbone.0.bias", "backbone.0.weight", "head.bias", "norm.bias", "norm.weight"]
    assert net.head.weight.requires_grad


def test_freeze_typo_or_foreign_module_raises_and_changes_nothing() -> None:
    net = Net()
    with pytest.raises(FtrainError) as err:
        freeze(net, "backbone.*", "bakbone.*")
    assert "'bakbone.*'" in str(err.value) and "backbone.0.weight" in str(err.value)
    assert frozen_names(net) == []
    with pytest.raises(FtrainError, match="not a submodule"):
        freeze(net, nn.Linear(2, 2))
    with pytest.raises(FtrainError, match="matches no parameter"):
        freeze(net, net.backbone[1])  # a ReLU has no parameters
    with pytest.raises(FtrainError, match="at least one"):
        unfreeze(net)
    with pytest.raises(FtrainError, match="not a Parameter"):
        freeze(net, net.head.weight)  # type: ignore[arg-type]


def test_tied_parameter_selected_by_alias_once() -> None:
    net = Net()
    net.head2 = nn.Linear(8, 3)
    net.head2.weight = net.head.weight
    assert freeze(net, "head2.*") == ["head.weight", "head2.weight", "head2.bias"]
    assert frozen_names(net) == ["head.weight", "head2.bias", "head2.weight"]
    assert unfreeze(net, "head.weight") == ["head.weight", "head2.weight"]  # one parameter, both names
    groups = param_groups(net, {"head2.*": 0.5}, include_frozen=True)
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == len(list(net.parameters()))


# ------------------------------------------------------------ param groups
def test_param_groups_per_pattern_lr_defaults_and_frozen() -> None:
    net = Net()
    freeze(net, "backbone.0.*")
    groups = param_groups(net, {"head.*": 1e-2, "*.bias": {"weight_decay": 0.0}}, lr=1e-4, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["head.*", "*.bias", "default"]
    assert groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.1
    assert groups[1] == {"params": [net.backbone[2].bias, net.norm.bias], "name": "*.bias", "lr": 1e-4,
                         "weight_decay": 0.0}
    assert groups[2]["params"] == [net.backbone[2].weight, net.norm.weight] and groups[2]["lr"] == 1e-4

    with_frozen = param_groups(net, {"head.*": 1e-2, "*.bias": {"weight_decay": 0.0}}, include_frozen=True)
    assert with_frozen[1]["params"][0] is net.backbone[0].bias
    assert with_frozen[2]["params"][0] is net.backbone[0].weight and "lr" not in with_frozen[2]
    # a rule whose parameters are all frozen just has no group (nothing to optimize yet)
    assert [g["name"] for g in param_groups(net, {"backbone.0.*": 1.0})] == ["default"]


def test_param_groups_errors() -> None:
    net = Net()
    with pytest.raises(FtrainError, match="'haed.*'.*matches no parameter"):
        param_groups(net, {"haed.*": 1e-3})
    with pytest.raises(FtrainError, match="'head.*'.*earlier rules"):
        param_groups(net, {"*": 1e-3, "head.*": 1e-2})
    with pytest.raises(FtrainError, match="params"):
        param_groups(net, {"head.*": {"params": []}})
    with pytest.raises(FtrainError, match="expected a learning rate"):
        param_groups(net, {"head.*": "fast"})  # type: ignore[dict-item]


def test_optimizer_accepts_named_groups_and_state_dict_round_trips() -> None:
    def build() -> tuple[Net, torch.optim.Optimizer]:
        net = Net()
        freeze(net, "backbone.*")
        opt = torch.optim.AdamW(param_groups(net, {"head.*": 1e-2}, include_frozen=True), lr=1e-4)
        return net, opt

    net, opt = build()
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 4)).pow(2).sum().backward()
        opt.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    sd = opt.state_dict()
    assert [g["name"] for g in sd["param_groups"]] == ["head.*", "default"]

    net2, opt2 = build()
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(sd)
    assert [(g["name"], g["lr"]) for g in opt2.param_groups] == [("head.*", 1e-2), ("default", 1e-4)]
    unfreeze(net2, "backbone.*")  # gradual unfreezing: the optimizer already holds these parameters
    x = torch.randn(4, 4)
    opt2.zero_grad()
    net2(x).pow(2).sum().backward()
    opt2.step()
    assert not torch.equal(net2.backbone[0].weight, net.backbone[0].weight)
