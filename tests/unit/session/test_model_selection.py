"""In-process tests of keep-best retention, save_best_only, load_best_at_end, early stopping and
trainable-only checkpoints, against real files on disk."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import ftrain
from ftrain import faults
from ftrain.session import rng
from ftrain.checkpoint import codec
from ftrain.checkpoint import format as layout
from ftrain.checkpoint.store import CheckpointStore
from ftrain.config import CheckpointConfig, FtrainConfig
from ftrain.errors import ConfigError, StateMismatch

import helpers
from helpers import SgdJob

#: A scripted validation loss, reported every 5 steps (and once off the save schedule, at step 22).
SCRIPT = {5: 1.0, 10: 0.5, 15: 0.7, 20: 0.4, 22: 0.3, 25: 0.9, 30: 0.45, 35: 0.8, 40: 0.6}


#: helpers.cfg, monitoring val_loss unless a test says otherwise.
cfg = partial(helpers.cfg, monitor="val_loss")


def open_session(config: FtrainConfig, **objects: object) -> ftrain.Session:
    """A session with ``objects`` registered (restore is the caller's: some tests expect it to fail)."""
    session = ftrain.Session(config)
    session.register(**objects)
    return session


def run(path: Path, until: int, config: FtrainConfig, script: dict[int, float] = SCRIPT,
        weights: dict[int, dict[str, torch.Tensor]] | None = None) -> tuple[SgdJob, ftrain.Session, int]:
    """Train to ``until`` (or an early stop), reporting ``script``; returns the job, session and last step."""
    job = SgdJob()
    session = open_session(config, model=job.model, optimizer=job.opt)
    step = session.restore()
    while step < until and not session.should_stop:
        job.train()
        step += 1
        if step in script:
            session.report(val_loss=script[step], train_loss=step * 0.01)
        session.step(step)
        if weights is not None:
            weights[step] = {k: v.clone() for k, v in job.model.state_dict().items()}
    session.close()
    return job, session, step


def on_disk(path: Path) -> list[int]:
    return [s for s, _ in CheckpointStore(path).step_dirs()]


def test_keep_best_and_keep_last_leave_exactly_the_right_checkpoints(tmp_path: Path) -> None:
    run(tmp_path, 40, cfg(tmp_path, every_steps=5, keep_last=2, keep_best=2))
    # Newest two: 35, 40. Best two by val_loss among saved ones: 22 (0.3, saved off-schedule because it ranked)
    # and 20 (0.4). 30 (0.45) was a best one until 22 arrived, then pruned.
    assert on_disk(tmp_path) == [20, 22, 35, 40]
    assert CheckpointStore(tmp_path).best_hint() == layout.step_dirname(22)
    store = CheckpointStore(tmp_path)
    m = store.validate(22)
    assert m.meta["metrics"] == {"val_loss": 0.3, "train_loss": 0.22}
    assert m.meta["monitor"] == {"name": "val_loss", "mode": "min"}
    assert m.meta["best_steps"] == [22, 20]
    assert store.validate(35).meta["metrics"] == {"val_loss": 0.8, "train_loss": 35 * 0.01}


def test_a_restarted_run_keeps_the_same_checkpoints(tmp_path: Path) -> None:
    run(tmp_path / "ref", 40, cfg(tmp_path / "ref", every_steps=5, keep_last=2, keep_best=2))
    run(tmp_path / "cut", 27, cfg(tmp_path / "cut", every_steps=5, keep_last=2, keep_best=2))
    run(tmp_path / "cut", 40, cfg(tmp_path / "cut", every_steps=5, keep_last=2, keep_best=2))
    assert on_disk(tmp_path / "cut") == on_disk(tmp_path / "ref") == [20, 22, 35, 40]


def test_best_pointer_and_max_mode(tmp_path: Path) -> None:
    script = {s: 1 - v for s, v in SCRIPT.items()}
    job = SgdJob()
    session = open_session(cfg(tmp_path, monitor="val_acc", every_steps=5, keep_last=1, keep_best=1), model=job.model)
    session.restore()
    for step in range(1, 41):
        job.train()
        if step in script:
            session.report(val_acc=torch.tensor(script[step]))  # a 0-dim tensor is accepted
        session.step(step)
    session.close()
    assert on_disk(tmp_path) == [22, 40]
    assert CheckpointStore(tmp_path).validate(40).meta["monitor"]["mode"] == "max"


def test_save_best_only_writes_only_improving_checkpoints(tmp_path: Path) -> None:
    run(tmp_path, 40, cfg(tmp_path, every_steps=5, keep_last=0, keep_best=1, save_best_only=True))
    assert on_disk(tmp_path) == [5, 10, 20, 22]  # the improvements over the best so far, nothing else


def test_load_best_at_end_loads_the_best_weights(tmp_path: Path) -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}
    job, session, _ = run(tmp_path, 40, cfg(tmp_path, every_steps=5, keep_last=1, keep_best=2,
                                             load_best_at_end=True), weights=weights)
    assert session.best_step == 22
    for k, v in job.model.state_dict().items():
        assert torch.equal(v, weights[22][k]), k


def test_load_best_skips_a_corrupt_best_checkpoint(tmp_path: Path, caplog) -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}
    run(tmp_path, 40, cfg(tmp_path, every_steps=5, keep_last=1, keep_best=2), weights=weights)
    shard = tmp_path / layout.step_dirname(22) / layout.shard_names(0)[1]
    data = bytearray(shard.read_bytes())
    data[70] ^= 0xFF
    shard.write_bytes(data)
    job = SgdJob()
    session = open_session(cfg(tmp_path, every_steps=5, keep_last=1, keep_best=2), model=job.model, optimizer=job.opt)
    session.restore()
    assert session.load_best() == 20
    assert "checksum mismatch" in caplog.text
    for k, v in job.model.state_dict().items():
        assert torch.equal(v, weights[20][k]), k
    session.close()


EARLY = {s: v for s, v in zip(range(3, 200, 3), [1.0, 0.8, 0.7, 0.69, 0.71, 0.6, 0.65, 0.62, 0.66, 0.61, 0.1])}


def test_early_stopping_stops_at_the_same_step_after_restarts(tmp_path: Path) -> None:
    config = cfg(tmp_path / "ref", every_steps=4, keep_best=1, patience=3, min_delta=0.02)
    ref, _, ref_stop = run(tmp_path / "ref", 100, config, script=EARLY)
    # 0.69 (step 12) is not better than 0.7 by more than 0.02; 0.6 (18) is; then 21, 24, 27, 30 do not improve.
    assert ref_stop == 27
    # The same run, cut at several points and resumed from its newest checkpoint each time.
    cut = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, dir=str(tmp_path / "cut")))
    for until in (7, 13, 22, 26):
        run(tmp_path / "cut", until, cut, script=EARLY)
    job, session, stop = run(tmp_path / "cut", 100, cut, script=EARLY)
    assert stop == ref_stop and session.should_stop
    for k, v in ref.model.state_dict().items():
        assert torch.equal(job.model.state_dict()[k], v)
    # The stop was checkpointed, so a restart does not train on.
    again, session, stop = run(tmp_path / "cut", 100, cut, script=EARLY)
    assert session.should_stop and stop == 27


def test_config_refuses_selection_options_without_a_monitor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.selection\.save_best_only needs checkpoint\.selection\.monitor"):
        cfg(tmp_path, monitor="", save_best_only=True)
    with pytest.raises(ConfigError, match="early_stopping.patience needs checkpoint.selection.monitor"):
        cfg(tmp_path, monitor="", patience=2)
    with pytest.raises(ConfigError, match="keep_best >= 1"):
        cfg(tmp_path, keep_best=0, load_best_at_end=True)


def test_report_rejects_non_numbers(tmp_path: Path) -> None:
    session = ftrain.Session(cfg(tmp_path))
    with pytest.raises(ftrain.FtrainError, match="val_loss"):
        session.report(val_loss="low")


# ------------------------------------------------------------------ fine-tuning state
class Adapted(nn.Module):
    """A frozen base with small trainable adapters (LoRA-like)."""

    def __init__(self, width: int = 64, layers: int = 4, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(layers))
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for base, down, up in zip(self.base, self.down, self.up):
            x = torch.tanh(base(x) + up(down(x)))
        return self.norm(x)


def adapted_job(seed: int = 0, width: int = 64) -> tuple[Adapted, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Adapted(width)
    for p in model.base.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def train_adapted(model: Adapted, opt: torch.optim.Optimizer, session: ftrain.Session, start: int, until: int) -> None:
    for step in range(start + 1, until + 1):
        loss = model(torch.randn(8, model.base[0].in_features)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step(step)
    session.close()


def bin_bytes(path: Path) -> int:
    step = on_disk(path)[-1]
    return sum(f.stat().st_size for f in (path / layout.step_dirname(step)).glob("*.bin"))


def test_trainable_only_saves_bytes_in_proportion_and_resumes_exactly(tmp_path: Path) -> None:
    def session_for(d: Path, trainable_only: bool) -> ftrain.Session:
        return ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(
            dir=str(d), every_steps=5, trainable_only=trainable_only)))

    sizes = {}
    for only in (False, True):
        model, opt = adapted_job()
        session = session_for(tmp_path / str(only), only)
        session.register(model=model, optimizer=opt)
        train_adapted(model, opt, session, session.restore(), 10)
        sizes[only] = bin_bytes(tmp_path / str(only))
        meta = CheckpointStore(tmp_path / str(only)).validate(10).meta
        assert meta["trainable_only"] is only and meta["frozen"]["model"] == sorted(
            f"base.{i}.{w}" for i in range(4) for w in ("bias", "weight"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # Full: every parameter, AdamW's two moments of the trainable ones, buffers. Trainable-only: no base.
    assert sizes[False] - sizes[True] == pytest.approx(frozen, abs=64 * 24)  # 64-byte alignment padding
    _, rng_tensors = codec.encode(rng.capture(), "rng")
    rng_bytes = sum(t.numel() * t.element_size() for t in rng_tensors.values())
    steps = 4 * sum(1 for p in model.parameters() if p.requires_grad)  # AdamW's per-parameter step counters
    assert sizes[True] == pytest.approx(3 * trainable + buffers + steps + rng_bytes, abs=64 * 40)
    assert sizes[True] < 0.25 * sizes[False]
    # Resume on top of the same base is exact.
    ref_model, ref_opt = adapted_job()
    ref = session_for(tmp_path / "ref", True)
    ref.register(model=ref_model, optimizer=ref_opt)
    train_adapted(ref_model, ref_opt, ref, ref.restore(), 20)
    model, opt = adapted_job()
    session = session_for(tmp_path / str(True), True)
    session.register(model=model, optimizer=opt)
    assert session.restore() == 10
    train_adapted(model, opt, session, 10, 20)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_trainable_only_refuses_a_different_base(tmp_path: Path) -> None:
    config = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5, trainable_only=True))
    model, opt = adapted_job()
    session = open_session(config, model=model, optimizer=opt)
    train_adapted(model, opt, session, session.restore(), 5)
    recorded = CheckpointStore(tmp_path).validate(5).meta["base_fingerprint"]["model"]
    other, opt = adapted_job(seed=1)  # the same architecture, other base weights
    session = open_session(config, model=other, optimizer=opt)
    with pytest.raises(StateMismatch, match="base model fingerprint mismatch") as err:
        session.restore()
    assert recorded in str(err.value)
    adapters = {k: v.clone() for k, v in other.state_dict().items()}
    for k, v in other.state_dict().items():  # nothing was loaded
        assert torch.equal(v, adapters[k])


def test_frozen_flags_are_restored_as_saved(tmp_path: Path) -> None:
    """Gradual unfreezing: a run that unfroze its base before the checkpoint resumes unfrozen."""
    config = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5))
    model, opt = adapted_job()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # knows every parameter, frozen or not
    session = open_session(config, model=model, optimizer=opt)
    session.restore()
    for p in model.base.parameters():
        p.requires_grad_(True)
    train_adapted(model, opt, session, 0, 5)
    model, _ = adapted_job()  # the script freezes the base again at start...
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = open_session(config, model=model, optimizer=opt)
    session.restore()
    assert all(p.requires_grad for p in model.parameters())  # ...and the checkpoint's flags win
    session.close()


def test_manifest_metrics_are_strict_json(tmp_path: Path) -> None:
    run(tmp_path, 10, cfg(tmp_path, every_steps=5), script={5: math.nan, 10: math.inf})
    body = json.loads((tmp_path / layout.step_dirname(10) / layout.MANIFEST).read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert body["body"]["meta"]["metrics"]["val_loss"] == "inf"


def test_metrics_reported_before_a_final_save_are_recorded_and_can_stop(tmp_path: Path) -> None:
    """The common "evaluate, report, save" after the loop: the step was already saved by the schedule."""
    config = cfg(tmp_path, every_steps=5, keep_best=1, patience=1)
    job, session, _ = run(tmp_path, 10, config, script={5: 0.5})
    session = open_session(config, model=job.model, optimizer=job.opt)
    assert session.restore() == 10
    session.report(val_loss=0.9)
    session.save(10)  # step 10 is saved again, now with its metrics and the early stop
    session.close()
    meta = CheckpointStore(tmp_path).validate(10).meta
    assert meta["metrics"] == {"val_loss": 0.9}
    assert meta["selection"]["early_stopping"]["stopped_step"] == 10
    again = open_session(config, model=job.model, optimizer=job.opt)
    again.restore()
    assert again.should_stop


def test_a_failed_best_save_does_not_cost_the_real_best(tmp_path: Path, monkeypatch) -> None:
    """The save of a new best fails in the background, then a preemption arrives: the preemption checkpoint
    must keep protecting the previous best (the failed one displaced it in the ranking), and `best` names it."""
    config = cfg(tmp_path, every_steps=5, keep_last=1, keep_best=1)
    job = SgdJob()
    session = open_session(config, model=job.model, optimizer=job.opt)
    session.restore()
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("raise@save.mid_write:step=7"))
    for step, value in ((1, None), (2, None), (3, 0.5), (4, None), (5, None), (6, None), (7, 0.1)):
        job.train()
        if value is not None:
            session.report(val_loss=value)
        session.step(step)  # 3 and 7 rank best and are saved; the save of 7 fails in the background
    session._checkpointer.wait()
    session._liveness.request_preemption("test")
    job.train()
    with pytest.raises(SystemExit):
        session.step(8)
    store = CheckpointStore(tmp_path)
    assert on_disk(tmp_path) == [3, 8] and store.best_hint() == layout.step_dirname(3)
    assert store.validate(8).meta["best_steps"] == [3]


def test_a_best_step_that_is_gone_is_dropped_on_restore(tmp_path: Path, caplog) -> None:
    config = cfg(tmp_path, every_steps=5, keep_last=1, keep_best=2)
    job, _, _ = run(tmp_path, 10, config, script={5: 0.5, 10: 0.7})
    assert on_disk(tmp_path) == [5, 10]
    shutil.rmtree(tmp_path / layout.step_dirname(5))  # deleted by hand
    session = open_session(config, model=job.model, optimizer=job.opt)
    session.restore()
    assert session._selection.best_steps == [10] and "step 5 is gone" in caplog.text
    session.close()


def test_a_dangling_best_pointer_is_removed(tmp_path: Path) -> None:
    run(tmp_path, 10, cfg(tmp_path, every_steps=5, keep_last=1, keep_best=1), script={5: 0.5})
    store = CheckpointStore(tmp_path)
    assert store.best_hint() == layout.step_dirname(5)
    (tmp_path / layout.BEST).write_text(layout.step_dirname(3) + "\n")
    store.update_best_hint(None)
    assert store.best_hint() is None


def test_trainable_only_saves_base_parameters_that_were_trained(tmp_path: Path) -> None:
    """Unfreeze a base layer, train it, freeze it again: its values exist nowhere else, so they are saved."""
    config = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5, trainable_only=True))
    model, _ = adapted_job()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = open_session(config, model=model, optimizer=opt)
    session.restore()
    train_adapted(model, opt, session, 0, 5)
    for p in model.base[0].parameters():
        p.requires_grad_(True)
    train_adapted(model, opt, session, 5, 6)
    for p in model.base[0].parameters():
        p.requires_grad_(False)
    session.save(6)
    session.close()
    meta = CheckpointStore(tmp_path).validate(6).meta
    assert meta["omitted"]["model"] == sorted(f"base.{i}.{w}" for i in (1, 2, 3) for w in ("bias", "weight"))
    assert "base.0.weight" in meta["frozen"]["model"]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, _ = adapted_job()  # the pristine base, as the script loads it
    session = open_session(config, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert session.restore() == 6
    for k, v in trained.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    session.close()


def test_trainable_only_checkpoint_on_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    config = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5, trainable_only=True))
    model, opt = adapted_job()
    session = open_session(config, model=model, optimizer=opt)
    train_adapted(model, opt, session, session.restore(), 5)
    torch.manual_seed(0)
    smaller = Adapted(layers=3)
    for p in smaller.base.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in smaller.parameters() if p.requires_grad])
    session = open_session(config, model=smaller, optimizer=opt)
    with pytest.raises(StateMismatch, match="does not have.*base.3"):
        session.restore()


def test_turning_trainable_only_on_after_full_training_keeps_the_trained_weights(tmp_path: Path) -> None:
    """Stage 1 trains everything with full checkpoints; stage 2 resumes, freezes the base and turns trainable-only
    on. The base was trained in stage 1, so it is no "base" that a script could reload: it must stay in the saves."""
    model, _ = adapted_job()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    full = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5))
    session = open_session(full, model=model, optimizer=opt)
    train_adapted(model, opt, session, session.restore(), 4)
    for p in model.base.parameters():  # the end of stage 1 freezes the (trained) base: the checkpoint records it
        p.requires_grad_(False)
    session.save(5)
    session.close()
    only = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=5, trainable_only=True))
    model, _ = adapted_job()  # the script: pristine base, frozen
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = open_session(only, model=model, optimizer=opt)
    assert session.restore() == 5
    train_adapted(model, opt, session, 5, 10)
    assert "model" not in CheckpointStore(tmp_path).validate(10).meta["omitted"]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model, _ = adapted_job()
    session = open_session(only, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert session.restore() == 10
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k], v), k
    session.close()
