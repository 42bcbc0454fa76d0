"""``ftrain ckpt export|inspect`` (and the metric/best columns of ``ls``), in process on real checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ftrain
from ftrain.checkpoint import format as layout
from ftrain.session.checkpointer import Checkpointer
from ftrain.cli import main as cli
from ftrain.session import rng
from ftrain.session.collectives import Collectives
from ftrain.config import CheckpointConfig, RetentionConfig

safetensors_torch = pytest.importorskip("safetensors.torch")


def make_model() -> torch.nn.Module:
    # BatchNorm adds buffers, one of them int64 (num_batches_tracked): not only float parameters are exported.
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def save_run(root: Path, metrics: list[dict[str, Any]], *, mode: str | None = "min",
             model: torch.nn.Module | None = None, extra_meta: dict[str, Any] | None = None,
             ) -> tuple[torch.nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """Train one step per entry of ``metrics`` and checkpoint steps 1..n with those metrics recorded.

    Uses the low-level Checkpointer, so the manifest meta (metrics, monitor, ...) is exactly what the test says.
    """
    torch.manual_seed(0)
    model = model or make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ck = Checkpointer(CheckpointConfig(dir=str(root), async_save=False, retention=RetentionConfig(keep_last=0)), Collectives(0, 1))
    ck.setup()
    snaps = {}
    for step, m in enumerate(metrics, start=1):
        loss = model(torch.randn(5, 4)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        meta: dict[str, Any] = {"replicated": ["model", "optimizer"], "per_rank": [], "metrics": m}
        if mode:
            meta["monitor"] = {"name": "val_loss" if mode == "min" else "val_acc", "mode": mode}
        meta.update(extra_meta or {})
        ck.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()}, {"rng": rng.capture()}, meta,
                blocking=True)
        snaps[step] = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return model, snaps


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["ckpt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def outputs_equal(state: dict[str, torch.Tensor], reference: torch.nn.Module) -> bool:
    fresh = make_model()
    fresh.load_state_dict(state)  # strict: exactly the model's keys, no optimizer tensors
    fresh.eval()
    reference.eval()
    x = torch.randn(6, 4)
    with torch.no_grad():
        return torch.equal(fresh(x), reference(x))


LOSSES = [{"val_loss": 0.5, "lr": 1e-2}, {"val_loss": 0.2, "lr": 1e-2}, {"val_loss": 0.3, "lr": "nan"}]


@pytest.fixture
def run3(tmp_path: Path) -> tuple[Path, torch.nn.Module, dict[int, dict[str, torch.Tensor]]]:
    root = tmp_path / "ckpt"
    model, snaps = save_run(root, LOSSES)
    return root, model, snaps


def test_export_round_trip_safetensors_and_torch(run3, tmp_path, capsys):
    root, model, snaps = run3
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    code, out, err = run(capsys, "export", str(root), str(st))
    assert code == 0, err
    assert out.startswith("exported step 3 object 'model': 9 tensors") and str(st) in out and "(safetensors)" in out
    code, out, err = run(capsys, "export", str(root), str(pt), "--step", "latest")
    assert code == 0 and "(torch)" in out, err

    loaded_st = safetensors_torch.load_file(str(st))
    loaded_pt = torch.load(pt, weights_only=True)
    assert set(loaded_st) == set(loaded_pt) == set(model.state_dict())  # no optimizer tensors
    for state in (loaded_st, loaded_pt):
        for k, v in model.state_dict().items():
            assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
        assert outputs_equal(state, model)

    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt" and md["ftrain_step"] == "3" and md["ftrain_object"] == "model"
    assert md["ftrain_source"] == str((root / layout.step_dirname(3)).resolve())
    assert json.loads(md["ftrain_metrics"]) == {"val_loss": 0.3, "lr": "nan"}
    assert "ftrain_trainable_only" not in md
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_export_from_a_session_checkpoint_and_a_step_dir(tmp_path, capsys):
    d = tmp_path / "s"
    torch.manual_seed(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = ftrain.Session(overrides={"checkpoint.dir": str(d), "checkpoint.async_save": False,
                                        "checkpoint.retention.keep_last": 0})
    session.register(model=model, optimizer=opt)
    session.restore()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    session.save(7, blocking=True)
    session.close()
    out_file = tmp_path / "m.pth"
    code, out, err = run(capsys, "export", str(d / layout.step_dirname(7)), str(out_file))
    assert code == 0 and "exported step 7" in out, err
    assert outputs_equal(torch.load(out_file, weights_only=True), model)


@pytest.mark.parametrize("mode, metrics, best", [
    ("min", [{"val_loss": 0.5}, {"val_loss": 0.2}, {"val_loss": 0.3}], 2),
    ("max", [{"val_acc": 0.5}, {"val_acc": 0.2}, {"val_acc": 0.9}, {"val_acc": "nan"}], 3),
])
def test_best_and_latest_selectors(tmp_path, capsys, mode, metrics, best):
    root = tmp_path / "ckpt"
    _, snaps = save_run(root, metrics, mode=mode)
    for step, want in (("best", best), ("latest", len(metrics)), ("1", 1)):
        out_file = tmp_path / f"{step}.safetensors"
        code, out, err = run(capsys, "export", str(root), str(out_file), "--step", step)
        assert code == 0 and f"exported step {want} " in out, err
        got = safetensors_torch.load_file(str(out_file))
        assert all(torch.equal(got[k], v) for k, v in snaps[want].items())
    code, out, _ = run(capsys, "ls", str(root))
    lines = out.splitlines()
    assert lines[0].split()[4] == f"val_{'loss' if mode == 'min' else 'acc'}"
    assert lines[best].endswith("<- best") and lines[len(metrics)].endswith("<- latest")
    doc = json.loads(run(capsys, "ls", str(root), "--json")[1])
    assert doc["best"] == best and doc["monitor"] == {"name": f"val_{'loss' if mode == 'min' else 'acc'}", "mode": mode}
    assert [r["best"] for r in doc["checkpoints"]] == [s == best for s in range(1, len(metrics) + 1)]
    assert doc["checkpoints"][0]["metrics"] == metrics[0]


def test_best_without_a_monitor_is_a_clear_error_and_ls_shows_no_best(tmp_path, capsys):
    root = tmp_path / "ckpt"
    save_run(root, [{}, {}], mode=None)
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "w.pt"), "--step", "best")
    assert code == 1 and "records a monitored metric" in err and len(err.splitlines()) == 1
    code, out, _ = run(capsys, "ls", str(root))
    assert code == 0 and "best" not in out and out.splitlines()[-1].endswith("<- latest")
    assert not (tmp_path / "w.pt").exists()


def test_corrupt_newest_latest_falls_back_explicit_step_fails(run3, tmp_path, capsys):
    root, _, snaps = run3
    bad = root / layout.step_dirname(3) / "shard-00000.bin"
    flip_byte(bad)
    out_file = tmp_path / "w.safetensors"
    code, out, err = run(capsys, "export", str(root), str(out_file))
    assert code == 0 and "exported step 2 " in out
    assert "warning: skipping checkpoint step 3" in err and "shard-00000.bin" in err and "checksum" in err
    got = safetensors_torch.load_file(str(out_file))
    assert all(torch.equal(got[k], v) for k, v in snaps[2].items())

    out_file.unlink()
    code, out, err = run(capsys, "export", str(root), str(out_file), "--step", "3")
    assert code == 1 and out == ""
    assert err.startswith("ftrain: error: ") and str(bad) in err and "checksum mismatch" in err
    assert list(tmp_path.iterdir()) == [root]  # neither OUT nor a temp file


def test_existing_out_is_refused_without_force(run3, tmp_path, capsys):
    root, model, _ = run3
    out_file = tmp_path / "w.pt"
    out_file.write_bytes(b"keep me")
    code, _, err = run(capsys, "export", str(root), str(out_file))
    assert code == 2 and "already exists" in err and "--force" in err
    assert out_file.read_bytes() == b"keep me"
    code, _, err = run(capsys, "export", str(root), str(out_file), "--force")
    assert code == 0, err
    assert outputs_equal(torch.load(out_file, weights_only=True), model)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions that apply to us")
def test_unwritable_or_missing_out_dir_is_one_clear_line(run3, tmp_path, capsys):
    root, _, _ = run3
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out, err = run(capsys, "export", str(root), str(ro / "w.safetensors"))
    finally:
        ro.chmod(0o700)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("ftrain: error: cannot write to") and "Permission denied" in err
    assert list(ro.iterdir()) == []
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "nope" / "w.pt"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_refused_temp_file_is_one_clear_line(run3, tmp_path, capsys, monkeypatch):
    # The same path as an unwritable directory, for when the tests run as root (permissions do not apply).
    root, _, _ = run3
    real_open = os.open

    def refuse(path: Any, *a: Any, **k: Any) -> int:
        if str(path).endswith(".exporting"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    code, out, err = run(capsys, "export", str(root), str(tmp_path / "w.safetensors"))
    monkeypatch.undo()
    assert code == 2 and out == "" and err == f"ftrain: error: cannot write to {str(tmp_path)!r} (Permission " \
                                              "denied); choose a writable OUT\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_failed_write_leaves_no_partial_file(run3, tmp_path, capsys, monkeypatch, fmt):
    root, _, _ = run3

    def disk_full(_obj: Any, f: Any, *a: Any, **k: Any) -> None:
        Path(f if isinstance(f, str) else f.name).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch if fmt == "safetensors" else torch,
                        "save_file" if fmt == "safetensors" else "save", disk_full)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(capsys, "export", str(root), str(out_dir / "w.bin"), "--format", fmt)
    assert code == 1 and out == "" and "No space left on device" in err and len(err.splitlines()) == 1
    assert list(out_dir.iterdir()) == []


def test_object_choice_errors_name_the_problem(run3, tmp_path, capsys):
    root, _, _ = run3
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "o.pt"), "--object", "optimizer")
    assert code == 1 and "'optimizer' is not a module state_dict" in err and "--object" in err
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "o.pt"), "--object", "nope")
    assert code == 1 and "'nope'" in err and "'model'" in err and "'optimizer'" in err
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "o.txt"))
    assert code == 2 and "suffix" in err
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "o.pt"), "--step", "newest")
    assert code == 2 and "'newest'" in err
    code, _, err = run(capsys, "export", str(tmp_path / "missing"), str(tmp_path / "o.pt"))
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class WithExtraState(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def get_extra_state(self) -> dict[str, int]:
        return {"version": 3}

    def set_extra_state(self, state: Any) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_non_tensor_entries_are_skipped_with_a_warning(tmp_path, capsys):
    root = tmp_path / "ckpt"
    model, _ = save_run(root, [{}], mode=None, model=torch.nn.Sequential(torch.nn.Linear(4, 2), WithExtraState()))
    code, out, err = run(capsys, "export", str(root), str(tmp_path / "w.safetensors"))
    assert code == 0 and "4 tensors" in out
    assert "warning: not exported (not tensors): 1._extra_state" in err
    assert set(safetensors_torch.load_file(str(tmp_path / "w.safetensors"))) == {
        "0.weight", "0.bias", "1.fc.weight", "1.fc.bias"}


def test_trainable_only_export_notes_what_is_missing(tmp_path, capsys):
    root = tmp_path / "ckpt"
    meta = {"trainable_only": True, "omitted": {"model": ["0.weight", "0.bias"]},
            "base_fingerprint": {"model": "ab12cd"}, "frozen": {"model": ["0.weight", "0.bias"]}}
    save_run(root, [{"val_loss": 1.0}], extra_meta=meta)
    out_file = tmp_path / "w.safetensors"
    code, out, err = run(capsys, "export", str(root), str(out_file))
    assert code == 0, err
    assert "note: step 1 is a trainable-only checkpoint: the 2 frozen base tensor(s) of 'model'" in err
    assert "fingerprint ab12cd" in err
    from safetensors import safe_open

    with safe_open(str(out_file), "pt") as f:
        md = f.metadata()
    assert md["ftrain_trainable_only"] == "true" and md["ftrain_base_fingerprint"] == "ab12cd"
    code, out, _ = run(capsys, "inspect", str(root))
    assert "trainable-only checkpoint; not saved: model: 2 frozen tensor(s); base fingerprint model=ab12cd" in out
    assert "frozen       model: 2 frozen parameter(s)" in out


def test_inspect_text_and_json(tmp_path, capsys):
    root = tmp_path / "ckpt"
    selection = {"version": 1, "monitor": "val_loss", "mode": "min", "best": [[0.2, 2], [0.5, 1]],
                 "early_stopping": {"best": 0.2, "best_step": 2, "evals_without_improvement": 1, "stopped_step": None},
                 "last": [3, 0.3]}
    # Nested sections as manifests record them now; "resume" flat as older manifests held every key.
    config = {"checkpoint": {"dir": str(root), "resume": "auto", "retention": {"keep_last": 0}},
              "early_stopping": {"patience": 3}}
    _, snaps = save_run(root, LOSSES, extra_meta={"selection": selection, "best_steps": [2, 1], "config": config})
    code, out, err = run(capsys, "inspect", str(root))
    assert code == 0, err
    assert "step         3\n" in out and "world size   1" in out
    assert "metrics      lr=nan  val_loss=0.3" in out and "monitor      val_loss (min)" in out
    assert "best         step 2 (0.2), step 1 (0.5)" in out
    assert "early stop   best 0.2 at step 2; 1 evaluation(s) without improvement; not stopped" in out
    assert "objects      replicated: model, optimizer; per-rank: -" in out
    assert "  checkpoint.retention.keep_last = 0" in out and "  early_stopping.patience = 3" in out
    assert "  checkpoint.resume = \"auto\"" in out
    row = next(ln for ln in out.splitlines() if "replicated/model/0.weight" in ln).split()
    assert row[1:4] == ["float32", "[8,", "4]"] and row[4] == "128" and row[5].startswith("shard-00000.bin")
    assert next(ln for ln in out.splitlines() if "num_batches_tracked" in ln).split()[1:3] == ["int64", "[]"]
    names = [ln.split()[0] for ln in out.split("  NAME")[1].splitlines()[1:]]
    assert names == sorted(names) and "replicated/optimizer/state/0/exp_avg" in names

    code, out, _ = run(capsys, "inspect", str(root), "--step", "best", "--json")
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert code == 0 and doc["step"] == 2 and doc["metrics"] == {"val_loss": 0.2, "lr": 0.01}
    assert doc["selection"]["early_stopping"]["evals_without_improvement"] == 1 and doc["best_steps"] == [2, 1]
    assert doc["config"]["early_stopping"] == {"patience": 3} and doc["verify"] is None
    t = {x["name"]: x for x in doc["tensors"]}["replicated/model/3.weight"]
    assert t["dtype"] == "float32" and t["shape"] == [3, 8] and t["bytes"] == 96
    assert doc["size_bytes"] == sum(p.stat().st_size for p in (root / layout.step_dirname(2)).iterdir()
                                    if p.name != layout.MANIFEST)
    code, out, _ = run(capsys, "inspect", str(root), "--json", "--no-tensors", "--step", "1")
    assert "tensors" not in json.loads(out) and json.loads(out)["step"] == 1
    code, out, _ = run(capsys, "inspect", str(root), "--no-tensors")
    assert "NAME" not in out


def test_inspect_verify_detects_corruption(run3, capsys):
    root, _, _ = run3
    bad = root / layout.step_dirname(3) / "shard-00000.bin"
    flip_byte(bad)
    code, out, _ = run(capsys, "inspect", str(root), "--step", "3")  # manifest only: the damage is not seen
    assert code == 0 and "\nverify" not in out
    code, out, _ = run(capsys, "inspect", str(root), "--step", "3", "--verify")
    assert code == 1 and f"verify       CORRUPT: {bad}: checksum mismatch" in out
    code, out, _ = run(capsys, "inspect", str(root), "--step", "3", "--verify", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["verify"] == "corrupt" and str(bad) in doc["verify_error"]
    code, out, err = run(capsys, "inspect", str(root), "--verify", "--no-tensors")  # latest falls back, like export
    assert code == 0 and "step         2\n" in out and "verify       ok" in out
    assert "warning: skipping checkpoint step 3" in err
    code, _, err = run(capsys, "inspect", str(root), "--step", "9")
    assert code == 1 and "no checkpoint of step 9" in err and "[1, 2, 3]" in err


def test_hostile_meta_is_shown_not_trusted(tmp_path, capsys):
    root = tmp_path / "ckpt"
    # Fields only shown. Those restore relies on (object names, frozen, omitted) ill-typed are damage: every command
    # calls the checkpoint corrupt (tests/unit/cli/test_verify.py).
    hostile = {"replicated": ["model", "optimizer"], "monitor": 5, "selection": [1, {"a": float("inf")}],
               "best_steps": "x", "trainable_only": "yes", "base_fingerprint": [1], "config": [float("nan")]}
    save_run(root, [{"val_loss": [1, 2], "\x1b[2Jevil": True}], mode=None, extra_meta=hostile)
    code, out, err = run(capsys, "inspect", str(root))
    assert code == 0, err
    assert "\x1b" not in out and "(unexpected shape)" in out
    assert "monitor      5 (unexpected shape)" in out
    code, out, _ = run(capsys, "inspect", str(root), "--json")
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["config"] == ["nan"] and doc["selection"] == [1, {"a": "inf"}] and doc["trainable_only"] is False
    code, out, _ = run(capsys, "ls", str(root))
    assert code == 0 and "<- latest" in out
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "w.pt"))
    assert code == 0, err


def test_object_listed_but_missing_from_the_tree_is_damage_not_a_crash(tmp_path, capsys):
    # reader.read_trees used to return {} here, and callers failed with a KeyError traceback.
    root = tmp_path / "ckpt"
    save_run(root, [{}], mode=None, extra_meta={"replicated": ["model", "optimizer", "ghost"]})
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "g.pt"), "--object", "ghost", "--step", "1")
    assert code == 1 and "'ghost' is listed in the manifest but missing from the state tree" in err


def test_session_with_monitor_and_trainable_only_end_to_end(tmp_path, capsys):
    # The meta a real Session writes (metrics, monitor, selection, best_steps, frozen, omitted, config).
    d = tmp_path / "run"
    torch.manual_seed(0)
    model = make_model()
    for p in model[0].parameters():
        p.requires_grad_(False)  # a frozen "base": trainable-only checkpoints leave it out
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    session = ftrain.Session(overrides={"checkpoint.dir": str(d), "checkpoint.async_save": False,
                                        "checkpoint.every_steps": 1, "checkpoint.retention.keep_last": 0,
                                        "checkpoint.selection.monitor": "val_loss", "checkpoint.retention.keep_best": 2,
                                        "checkpoint.trainable_only": True})
    session.register(model=model, optimizer=opt)
    weights = {}
    for step, loss in enumerate([0.9, 0.3, 0.6], start=session.restore() + 1):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        session.report(val_loss=loss)
        session.step(step)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    session.close()

    doc = json.loads(run(capsys, "inspect", str(d), "--json", "--step", "best")[1])
    assert doc["step"] == 2 and doc["metrics"] == {"val_loss": 0.3} and doc["monitor"]["name"] == "val_loss"
    assert doc["trainable_only"] is True and doc["omitted"] == {"model": 2} and doc["frozen"]["model"] == 2
    assert doc["config"]["checkpoint"]["retention"]["keep_best"] == 2
    assert "replicated/model/0.weight" not in {t["name"] for t in doc["tensors"]}
    code, out, _ = run(capsys, "inspect", str(d), "--no-tensors")
    assert code == 0 and "best         step 2 (0.3), step 3 (0.6)" in out  # keep_best 2 of 0.9, 0.3, 0.6
    assert "trainable    trainable-only checkpoint; not saved: model: 2 frozen tensor(s); base fingerprint" in out
    out_file = tmp_path / "best.safetensors"
    code, out, err = run(capsys, "export", str(d), str(out_file), "--step", "best")
    assert code == 0 and "exported step 2 " in out and "the 2 frozen base tensor(s) of 'model'" in err
    got = safetensors_torch.load_file(str(out_file))
    assert set(got) == set(weights[2]) - {"0.weight", "0.bias"}
    assert all(torch.equal(got[k], weights[2][k]) for k in got)
    code, out, _ = run(capsys, "ls", str(d))
    assert out.splitlines()[2].endswith("<- best") and out.splitlines()[3].endswith("<- latest")


def test_out_name_template_is_filled_from_step_and_metrics(run3, tmp_path, capsys):
    root, _, snaps = run3
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(capsys, "export", str(root), str(out_dir / "{object}-{step:04d}-{val_loss:.3f}.safetensors"),
                         "--step", "best")
    assert code == 0, err
    written = out_dir / "model-0002-0.200.safetensors"
    assert written.exists() and str(written) in out
    for k, v in safetensors_torch.load_file(str(written)).items():
        assert torch.equal(v, snaps[2][k]), k
    # The same name again is refused without --force; an unknown field names the available ones.
    code, _, err = run(capsys, "export", str(root), str(out_dir / "{object}-{step:04d}-{val_loss:.3f}.safetensors"),
                       "--step", "2")
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "export", str(root), str(out_dir / "w-{val_acc}.pt"))
    assert code == 2 and "val_acc" in err and "step" in err and "val_loss" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model-0002-0.200.safetensors"]  # no temp file left
