"""The first releases' flat keys still load, each with one deprecation line naming its new key (renamed.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from ftrain.config import config_keys, config_to_env, load_config, renamed
from ftrain.config.renamed import RENAMED, RENAMED_ENV
from ftrain.errors import ConfigError

from helpers import ROOT

#: A file in the old flat form, as configs/finetune.yaml and a remote run were written before sections nested.
OLD_YAML = """\
checkpoint:
  dir: runs/old
  keep_last: 4
  keep_best: 2
  monitor: val_loss
  mode: min
  load_best_at_end: true
  lease_ttl_seconds: 30
  remote: s3://bucket/runs/old
  remote_retries: 2
  on_uneven_batch: nearest
supervisor:
  notices: [aws, drain]
  notice_poll_seconds: 2
  drain_file: /tmp/DRAIN
"""


@pytest.fixture(autouse=True)
def fresh_deprecations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own lines: the ones said once per process may have been said by an earlier test."""
    monkeypatch.setattr(renamed, "_said", set())


def deprecations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is deprecated" in r.getMessage()]


def test_every_old_key_names_a_real_new_key_and_no_current_one() -> None:
    keys = set(config_keys())
    assert set(RENAMED.values()) <= keys
    assert not set(RENAMED) & keys


def test_an_old_flat_file_loads_as_its_nested_equivalent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(OLD_YAML)
    caplog.set_level(logging.WARNING, logger="ftrain.config.renamed")
    cfg = load_config(path, env={})
    ck, nc = cfg.checkpoint, cfg.supervisor.notices
    assert (ck.retention.keep_last, ck.retention.keep_best) == (4, 2)
    assert (ck.selection.monitor, ck.selection.mode, ck.selection.load_best_at_end) == ("val_loss", "min", True)
    assert ck.lease.ttl_seconds == 30.0 and (ck.remote.url, ck.remote.retries) == ("s3://bucket/runs/old", 2)
    assert cfg.data.on_uneven_batch == "nearest"
    assert (nc.sources, nc.poll_seconds, nc.drain_file) == (["aws", "drain"], 2.0, "/tmp/DRAIN")
    said = deprecations(caplog)
    assert len(said) == 12  # one line per old key (dir is no old key)
    assert f"checkpoint.keep_last in {path} is deprecated: write checkpoint.retention.keep_last instead" in said[0]
    assert all("\n" not in line for line in said)


def test_each_deprecation_is_said_once_per_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "once.yaml"
    path.write_text("checkpoint:\n  takeover: true\n")
    caplog.set_level(logging.WARNING, logger="ftrain.config.renamed")
    for _ in range(3):
        assert load_config(path, env={}).checkpoint.lease.takeover
    assert len(deprecations(caplog)) == 1


def test_a_file_setting_a_key_under_both_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("checkpoint:\n  keep_last: 4\n  retention:\n    keep_last: 5\n")
    with pytest.raises(ConfigError, match=r"sets both checkpoint\.keep_last and checkpoint\.retention\.keep_last") as e:
        load_config(path, env={})
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_old_environment_variables_and_overrides_still_work(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ftrain.config.renamed")
    cfg = load_config(env={"FTRAIN_CHECKPOINT_KEEP_LAST": "6", "FTRAIN_SUPERVISOR_NOTICES": "gcp",
                           "FTRAIN_CHECKPOINT_REMOTE": "file:///shared/ckpt"},
                      overrides={"checkpoint.monitor": "acc"})
    assert cfg.checkpoint.retention.keep_last == 6 and cfg.supervisor.notices.sources == ["gcp"]
    assert cfg.checkpoint.remote.url == "file:///shared/ckpt" and cfg.checkpoint.selection.monitor == "acc"
    said = deprecations(caplog)
    assert any("FTRAIN_CHECKPOINT_KEEP_LAST is deprecated: write FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST" in s
               for s in said)
    assert any("checkpoint.monitor from command-line override is deprecated" in s for s in said)


def test_an_old_variable_beside_its_new_one_must_agree() -> None:
    # What a worker sees when the user's shell still exports the old name: the launcher resolved it into the new.
    same = load_config(env={"FTRAIN_CHECKPOINT_KEEP_LAST": "6", "FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST": "6"})
    assert same.checkpoint.retention.keep_last == 6
    with pytest.raises(ConfigError, match="FTRAIN_CHECKPOINT_KEEP_LAST and FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST"):
        load_config(env={"FTRAIN_CHECKPOINT_KEEP_LAST": "6", "FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST": "7"})


def test_no_old_variable_is_the_name_of_another_current_key() -> None:
    current = set(config_to_env(load_config(env={})))
    assert not set(RENAMED_ENV) & current
    # The old names that equal their new key's variable need no entry at all.
    assert "FTRAIN_CHECKPOINT_REMOTE_KEEP_LAST" in current and "FTRAIN_CHECKPOINT_REMOTE_KEEP_LAST" not in RENAMED_ENV


def test_workers_are_not_handed_the_old_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ftrain.supervisor.command import LaunchSpec, base_env

    monkeypatch.setenv("FTRAIN_CHECKPOINT_KEEP_LAST", "6")
    cfg = load_config()
    spec = LaunchSpec(script=str(tmp_path / "train.py"), script_args=[], nproc=1, torchrun_args=[], run_id="r",
                      config=cfg)
    env = base_env(spec)
    assert "FTRAIN_CHECKPOINT_KEEP_LAST" not in env and env["FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST"] == "6"


def shipped_configs(tmp_path: Path) -> list[Path]:
    """configs/*.yaml, and the ftrain.yaml embedded in each Kubernetes recipe's ConfigMap, as files."""
    out = sorted((ROOT / "configs").glob("*.yaml"))
    for recipe in sorted((ROOT / "launcher" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(recipe.read_text()):
            if isinstance(doc, dict) and "ftrain.yaml" in (doc.get("data") or {}):
                out.append(tmp_path / f"{recipe.stem}-ftrain.yaml")
                out[-1].write_text(doc["data"]["ftrain.yaml"])
    return out


def test_the_shipped_configs_and_recipes_use_only_current_keys(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ftrain.config.renamed")
    files = shipped_configs(tmp_path)
    assert len(files) >= 5  # default, example, finetune, and the two Kubernetes recipes
    for path in files:
        load_config(path, env={})
    env = dict(line.split("=", 1) for line in (ROOT / "launcher" / "systemd" / "ftrain.env").read_text().splitlines()
               if line.startswith("FTRAIN_") and "=" in line)
    assert "FTRAIN_SUPERVISOR_NOTICES_SOURCES" in env
    load_config(env=env)
    assert deprecations(caplog) == []
