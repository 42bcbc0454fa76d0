"""In-process tests of the Session API, the corruption matrix, fallback and retention."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import format as layout
from ftrain.cli import main as cli
from ftrain.config import CheckpointConfig, FtrainConfig
from ftrain.errors import CheckpointDirError, CheckpointError, NoValidCheckpoint, StateMismatch

from conftest import ROOT, child_env


def cfg(path: Path, **kw) -> FtrainConfig:
    return FtrainConfig(checkpoint=CheckpointConfig(dir=str(path), **kw))


class Job:
    """A tiny model/optimizer/scheduler/counter set, trained with the global RNG (dropout-like draws)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.counters = ftrain.Counters(seen=0)

    def register(self, session: ftrain.Session) -> None:
        session.register(model=self.model, optimizer=self.opt, scheduler=self.sched, counters=self.counters)

    def train(self, n: int) -> None:
        for _ in range(n):
            loss = self.model(torch.randn(2, 4)).pow(2).sum()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.counters.seen += 2

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def run_to(path: Path, steps: int, every: int = 10, **kw) -> tuple[Job, ftrain.Session, dict[int, dict]]:
    job = Job()
    session = ftrain.Session(cfg(path, every_steps=every, **kw))
    job.register(session)
    start = session.restore()
    snaps = {}
    for step in range(start + 1, steps + 1):
        job.train(1)
        if session.step(step):
            snaps[step] = job.snapshot()
    session.close()
    return job, session, snaps


def test_restore_is_exact_including_rng_and_counters(tmp_path):
    ref, _, _ = run_to(tmp_path / "a", 25)
    ref_next = torch.rand(3)
    _, _, _ = run_to(tmp_path / "b", 17)  # "crash" after step 17; checkpoint at 10
    job = Job()
    session = ftrain.Session(cfg(tmp_path / "b", every_steps=10))
    job.register(session)
    assert session.restore() == 10
    job.train(15)
    assert job.counters.seen == ref.counters.seen == 50
    for k, v in ref.model.state_dict().items():
        assert torch.equal(job.model.state_dict()[k], v)
    assert torch.equal(torch.rand(3), ref_next)  # the RNG stream continues exactly


def damage_truncate(d: Path) -> str:
    f = d / "shard-00000.bin"
    f.write_bytes(f.read_bytes()[:-100])
    return "shard-00000.bin: size"


def damage_flip_bin(d: Path) -> str:
    f = d / "shard-00000.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    return "shard-00000.bin: checksum mismatch"


def damage_flip_json(d: Path) -> str:
    f = d / "shard-00000.json"
    data = bytearray(f.read_bytes())
    data[10] ^= 0x20
    f.write_bytes(bytes(data))
    return "shard-00000.json: checksum mismatch"


def damage_missing_manifest(d: Path) -> str:
    (d / "manifest.json").unlink()
    return "manifest.json: manifest missing"


def damage_missing_file(d: Path) -> str:
    (d / "shard-00000.bin").unlink()
    return "shard-00000.bin: file listed in the manifest is missing"


def damage_garbage_manifest(d: Path) -> str:
    (d / "manifest.json").write_bytes(b"\x8b\x00not json at all")
    return "manifest.json: manifest is not valid JSON"


def damage_flip_manifest(d: Path) -> str:
    f = d / "manifest.json"
    f.write_text(f.read_text().replace('"world_size": 1', '"world_size": 2'))
    return "manifest.json: manifest checksum mismatch"


DAMAGE = [damage_truncate, damage_flip_bin, damage_flip_json, damage_missing_manifest, damage_missing_file,
          damage_garbage_manifest, damage_flip_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.removeprefix("damage_"))
def test_corruption_is_detected_and_restore_falls_back(tmp_path, damage, capsys, caplog):
    root = tmp_path / "ckpt"
    _, _, snaps = run_to(root, 20)
    expected = damage(root / layout.step_dirname(20))

    assert cli(["ckpt", "verify", str(root), "20"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and expected in out, out
    assert cli(["ckpt", "verify", str(root)]) == 1
    assert cli(["ckpt", "verify", str(root), "10"]) == 0
    capsys.readouterr()
    assert cli(["ckpt", "ls", str(root)]) == 0
    assert expected.split(":")[0] in capsys.readouterr().out

    job = Job()
    session = ftrain.Session(cfg(root, every_steps=10))
    job.register(session)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        assert session.restore() == 10
    assert any(expected.split(":")[0] in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    for k, v in snaps[10].items():
        assert torch.equal(job.model.state_dict()[k], v)


def test_stale_temp_dir_is_ignored_and_cleaned(tmp_path, capsys):
    root = tmp_path / "ckpt"
    run_to(root, 20)
    stale = root / layout.tmp_dirname(30, "deadbeef")
    stale.mkdir()
    (stale / "shard-00000.bin").write_bytes(b"\x00" * 1000)
    (root / "latest.partial").write_text("step-000000000030")
    assert cli(["ckpt", "verify", str(root)]) == 0
    assert "2 valid, 0 corrupt" in capsys.readouterr().out
    job = Job()
    session = ftrain.Session(cfg(root))
    job.register(session)
    assert session.restore() == 20
    assert not stale.exists() and not (root / "latest.partial").exists()


def test_latest_pointer_is_not_trusted(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 30)
    (root / layout.LATEST).write_text(layout.step_dirname(10) + "\n")  # stale pointer
    damage_flip_bin(root / layout.step_dirname(30))
    job = Job()
    session = ftrain.Session(cfg(root))
    job.register(session)
    assert session.restore() == 20


def test_nothing_valid_starts_fresh_or_errors_when_required(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    damage_missing_manifest(root / layout.step_dirname(10))
    job = Job()
    s = ftrain.Session(cfg(root))
    job.register(s)
    assert s.restore() == 0
    s = ftrain.Session(cfg(root, resume="required"))
    job.register(s)
    with pytest.raises(NoValidCheckpoint, match="no valid checkpoint"):
        s.restore()


def test_resume_never_refuses_a_dir_with_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    job = Job()
    s = ftrain.Session(cfg(root, resume="never"))
    job.register(s)
    assert s.restore() == 0  # empty: fine
    s.save(10, blocking=True)
    s = ftrain.Session(cfg(root, resume="never"))
    job.register(s)
    with pytest.raises(CheckpointDirError, match="already holds checkpoints"):
        s.restore()  # mixing a new run into an old run's directory would let retention delete the new one


def test_unwritable_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    s = ftrain.Session(cfg(blocker / "ckpt"))
    Job().register(s)
    with pytest.raises(CheckpointDirError, match=r"not writable.*checkpoint\.dir") as e:
        s.restore()
    assert e.value.exit_code == 2


def test_registered_state_must_match(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    job = Job()
    s = ftrain.Session(cfg(root))
    s.register(model=job.model, optimizer=job.opt)
    with pytest.raises(StateMismatch, match=r"missing: \['counters', 'scheduler'\]"):
        s.restore()


def test_register_rejects_non_stateful_and_reserved_names(tmp_path):
    s = ftrain.Session(cfg(tmp_path))
    with pytest.raises(ftrain.FtrainError, match="Counters"):
        s.register(step=5)
    with pytest.raises(ftrain.FtrainError, match="rng"):
        s.register(rng=ftrain.Counters())


def test_retention_keeps_last_k(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 50, keep_last=2)
    assert [p.name for p in sorted(root.iterdir()) if p.is_dir()] == [layout.step_dirname(40), layout.step_dirname(50)]
    assert (root / layout.LATEST).read_text().strip() == layout.step_dirname(50)
    run_to(tmp_path / "all", 50, keep_last=0)
    assert len([p for p in (tmp_path / "all").iterdir() if p.is_dir()]) == 5


def test_every_seconds_triggers(tmp_path):
    job = Job()
    s = ftrain.Session(cfg(tmp_path, every_seconds=0.05))
    job.register(s)
    s.restore()
    assert not s.step(1)  # just restored: not due yet (0.05 s is far longer than this call)
    time.sleep(0.1)
    assert s.step(2)
    s.close()
    assert (tmp_path / layout.step_dirname(2)).is_dir()


def test_unstorable_state_fails_the_save_and_leaves_no_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    job, session, _ = run_to(root, 10)
    job.counters.bad = object()
    with pytest.raises(CheckpointError, match="counters/values/bad"):
        session.save(11)
    assert not (root / layout.step_dirname(11)).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    assert cli(["ckpt", "verify", str(root)]) == 0


def test_file_size_limit_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes writes fail like a full disk; the save must fail loudly and leave step 10 valid."""
    root = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import resource, signal, sys, time, torch, ftrain
        from ftrain.config import CheckpointConfig, FtrainConfig
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        model = torch.nn.Linear(64, 64)
        s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir={str(root)!r})))
        s.register(model=model)
        s.restore()
        s.save(10, blocking=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            s.save(20)
            for step in range(21, 1000):  # a background write's failure surfaces at the next step after it
                s.step(step)
                time.sleep(0.01)
        except ftrain.FtrainError as e:
            print("ERROR:", e)
            sys.exit(e.exit_code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "saving step 20 failed" in proc.stdout and "File too large" in proc.stdout, proc.stdout
    assert sorted(p.name for p in root.iterdir()) == [layout.LATEST, layout.step_dirname(10)]
    assert cli(["ckpt", "verify", str(root)]) == 0


def test_config_is_frozen_dataclass():
    c = cfg(Path("x"))
    assert dataclasses.replace(c.checkpoint, keep_last=1).keep_last == 1


def test_per_rank_choice_must_match(tmp_path):
    root = tmp_path / "ckpt"
    run_to(root, 10)
    job = Job()
    s = ftrain.Session(cfg(root))
    s.register(model=job.model, optimizer=job.opt, scheduler=job.sched)
    s.register(counters=job.counters, per_rank=True)
    with pytest.raises(StateMismatch, match=r"per_rank changed: \['counters'\]"):
        s.restore()


def test_checkpoint_moved_aside_by_an_interrupted_replace_is_recovered(tmp_path):
    """A kill between 'move old step-N aside' and 'move new step-N in' must not lose step N."""
    root = tmp_path / "ckpt"
    run_to(root, 20)
    (root / layout.step_dirname(20)).rename(root / f".tmp-replaced-{layout.step_dirname(20)}-0123abcd")
    job = Job()
    s = ftrain.Session(cfg(root))
    job.register(s)
    assert s.restore() == 20


def _script(body: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    head = textwrap.dedent(f"""
        import os, signal, sys, time, torch, ftrain
        from ftrain.config import CheckpointConfig, FtrainConfig
        model = torch.nn.Linear(8, 8)
        s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir={str(root)!r}, every_steps=2)))
        s.register(model=model)
        s.restore()
    """)
    return subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], env=child_env(**env),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_exit_without_close_fails_loudly_if_the_last_save_did_not_commit(tmp_path):
    root = tmp_path / "ckpt"
    proc = _script("""
        for step in range(1, 5):
            s.step(step)
        s.save(5)  # the background write of step 5 fails; the script never calls close()
    """, root, FTRAIN_FAULTS="raise@save.mid_write:step=5")
    assert proc.returncode == 1, proc.stderr
    assert "the last checkpoint did not commit" in proc.stderr
    assert sorted(p.name for p in root.glob("step-*")) == [layout.step_dirname(2), layout.step_dirname(4)]


def test_preemption_checkpoint_is_taken_even_if_the_previous_background_save_failed(tmp_path):
    root = tmp_path / "ckpt"
    proc = _script("""
        s.step(1)
        s.step(2)  # its background write fails (injected)
        time.sleep(0.5)  # whether or not the failure is already known at the next step
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice: only sets a flag
        s.step(3)
    """, root, FTRAIN_FAULTS="raise@save.mid_write:step=2")
    assert proc.returncode == 75, proc.stderr
    assert "previous background save failed" in proc.stderr
    assert [p.name for p in root.glob("step-*")] == [layout.step_dirname(3)]
    assert cli(["ckpt", "verify", str(root)]) == 0
