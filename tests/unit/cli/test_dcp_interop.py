"""DCP interop: ``ftrain ckpt export --format dcp`` and ``load_pretrained`` of a DCP directory, in process on real
files, loaded back through DCP's own APIs."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ftrain
from ftrain.cli import main as cli
from ftrain.errors import FtrainError, StateMismatch
from ftrain.finetune import load_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def make_model(width: int = 8) -> torch.nn.Module:
    # BatchNorm: buffers too, one of them int64 (num_batches_tracked).
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 3))


def trained(root: Path, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session = ftrain.Session(overrides={"checkpoint.dir": str(root), "checkpoint.async_save": False,
                                        "checkpoint.retention.keep_last": 0})
    session.register(model=model, optimizer=opt)
    session.restore()
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    session.save(steps, blocking=True)
    session.close()
    return model


def export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["ckpt", "export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fresh(seed: int = 1, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_model(width)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, torch.nn.Module]:
    model = trained(tmp_path / "ckpt")
    out = tmp_path / "model-dcp"
    code, stdout, err = export(capsys, str(tmp_path / "ckpt"), str(out), "--format", "dcp")
    assert code == 0, err
    assert "exported step 3 object 'model': 9 tensors" in stdout and "(dcp)" in stdout
    return out, model


def test_export_loads_with_dcp_itself(exported: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    out, model = exported
    assert (out / ".metadata").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp directory left
    keys = dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata.keys()
    assert set(keys) == set(model.state_dict())  # flat FQNs, exactly the model's: torchtitan's model-only layout
    target = fresh().state_dict()
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    assert_same(target, snapshot(model))


def test_load_pretrained_of_a_dcp_dir(exported: tuple[Path, torch.nn.Module]) -> None:
    out, model = exported
    dst = fresh()
    params = [p for p in dst.parameters()]
    report = load_pretrained(dst, out, strict=True)
    assert report.ok and len(report.loaded) == 9 and report.source == f"{out} (DCP)"
    assert_same(snapshot(dst), snapshot(model))
    assert all(a is b for a, b in zip(params, dst.parameters(), strict=True))  # in place: an optimizer stays valid


def test_other_architecture_is_refused_and_the_model_unchanged(exported: tuple[Path, torch.nn.Module]) -> None:
    out, _ = exported
    wide = fresh(width=16)
    before = snapshot(wide)
    with pytest.raises(StateMismatch, match=r"0\.weight source \[8, 4\] vs model \[16, 4\].*model unchanged"):
        load_pretrained(wide, out)
    assert_same(snapshot(wide), before)
    # A key the model lacks: strict=True refuses it, as for every other source.
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 8))
    before = snapshot(smaller)
    with pytest.raises(StateMismatch, match=r"strict=True.*unexpected \(1\.weight.*model unchanged"):
        load_pretrained(smaller, out, strict=True)
    assert_same(snapshot(smaller), before)
    with pytest.raises(FtrainError, match=r"step=.*DCP checkpoint"):
        load_pretrained(smaller, out, step="latest")


def test_export_refuses_a_non_empty_dir_and_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trained(tmp_path / "ckpt", steps=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for extra in ((), ("--force",)):  # nothing is deleted, --force or not
        code, _, err = export(capsys, str(tmp_path / "ckpt"), str(busy), "--format", "dcp", *extra)
        assert code == 2 and "is not empty" in err and "remove it or choose another name" in err, err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    code, _, err = export(capsys, str(tmp_path / "ckpt"), str(tmp_path / "file"), "--format", "dcp")
    assert code == 2 and "is not a directory" in err
    empty = tmp_path / "empty"  # an empty directory is taken, as `mkdir out && export ... out` expects
    empty.mkdir()
    code, _, err = export(capsys, str(tmp_path / "ckpt"), str(empty), "--format", "dcp")
    assert code == 0 and (empty / ".metadata").is_file(), err
    code, _, err = export(capsys, str(tmp_path / "ckpt"), str(tmp_path / "m-{step}"), "--format", "dcp")
    assert code == 0 and (tmp_path / "m-1" / ".metadata").is_file(), err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tied_weights_are_written_under_each_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def tied() -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
        m[1].weight = m[0].weight
        return m

    torch.manual_seed(0)
    model = tied()
    session = ftrain.Session(overrides={"checkpoint.dir": str(tmp_path / "c"), "checkpoint.async_save": False})
    session.register(model=model)
    session.restore()
    session.save(1, blocking=True)
    session.close()
    code, _, err = export(capsys, str(tmp_path / "c"), str(tmp_path / "d"), "--format", "dcp")
    assert code == 0 and "DCP stores it under each name" in err, err
    torch.manual_seed(1)
    dst = tied()
    report = load_pretrained(dst, tmp_path / "d", strict=True)
    assert report.ok and dst[1].weight is dst[0].weight and torch.equal(dst[0].weight, model[0].weight)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran from the pickle",))


def test_hostile_metadata_and_non_tensor_entries_are_not_unpickled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    src = fresh(0)
    d = tmp_path / "d"
    # A non-tensor entry: DCP pickles it and its planner would load it with weights_only=False.
    dcp.save({**snapshot(src), "extra": _Boom()}, checkpoint_id=str(d), no_dist=True)
    dst = fresh(1)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        report = load_pretrained(dst, d, strict=True)
    assert report.ok and "not reading 1 non-tensor entry" in caplog.text
    assert_same(snapshot(dst), snapshot(src))
    (d / ".metadata").write_bytes(pickle.dumps(_Boom()))
    before = snapshot(dst)
    with pytest.raises(FtrainError, match=r"needs code execution to load \(it pickles builtins\.print"):
        load_pretrained(dst, d)
    assert "code ran" not in capsys.readouterr().out
    assert_same(snapshot(dst), before)
