"""Tests for ftrain.config: defaults file, precedence, errors and the env round trip."""
from __future__ import annotations

import dataclasses
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrain.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_VALUE_CHARS,
    CheckpointConfig,
    DataConfig,
    EarlyStoppingConfig,
    FtrainConfig,
    NoticesConfig,
    RemoteConfig,
    RetentionConfig,
    SupervisorConfig,
    config_keys,
    config_to_dict,
    config_to_env,
    describe_keys,
    load_config,
)
from ftrain.config.values import parse_text
from ftrain.errors import ConfigError

from helpers import EXAMPLE, ROOT

CONFIGS = ROOT / "configs"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(match: str, **kwargs: object) -> ConfigError:
    """Call load_config, expect a one-line ConfigError containing ``match``, and return it."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    assert info.value.exit_code == 2
    return info.value


# --- defaults file -----------------------------------------------------------------------------

def test_default_yaml_equals_dataclass_defaults() -> None:
    assert load_config(CONFIGS / "default.yaml", env={}) == FtrainConfig()


def leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping, in order."""
    out: list[str] = []
    for name, value in data.items():
        out += leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return out


def test_default_yaml_lists_exactly_the_user_facing_config_keys() -> None:
    data = yaml.safe_load((CONFIGS / "default.yaml").read_text(encoding="utf-8"))
    assert leaves(data) == [key for key, _, _ in describe_keys(internal=False)]
    assert set(leaves(data)) < set(config_keys())  # the keys for tests (fake metadata services) are left out


def test_default_yaml_comments_match_help() -> None:
    # The comment directly above each key must be the key's help text, word for word.
    lines = (CONFIGS / "default.yaml").read_text(encoding="utf-8").splitlines()
    comments = {}
    path: list[str] = []
    for previous, line in zip(["", *lines], lines, strict=False):
        if match := re.fullmatch(r"( *)(\w+):", line):  # a section: its depth is its indent
            path = [*path[:len(match[1]) // 2], match[2]]
        elif match := re.fullmatch(r"( *)(\w+):.*", line):
            comments[".".join([*path[:len(match[1]) // 2], match[2]])] = previous.strip().removeprefix("# ")
    assert comments == {key: help_text for key, _, help_text in describe_keys(internal=False)}


def test_describe_keys_defaults() -> None:
    described = {key: default for key, default, _ in describe_keys()}
    assert described["checkpoint.retention.keep_last"] == 3
    assert described["checkpoint.resume"] == "auto"
    assert list(described) == config_keys()
    assert "supervisor.notices.aws_metadata_url" in described
    assert "supervisor.notices.aws_metadata_url" not in {k for k, _, _ in describe_keys(internal=False)}


def test_example_yaml() -> None:
    cfg = load_config(CONFIGS / "example.yaml", env={})
    assert cfg.checkpoint == CheckpointConfig(
        dir="runs/example/checkpoints", every_steps=50, every_seconds=300.0,
        retention=RetentionConfig(keep_last=5))
    assert cfg.supervisor == SupervisorConfig(
        max_restarts=5, backoff_seconds=2.0, backoff_max_seconds=60.0,
        hang_timeout_seconds=600.0, grace_seconds=90.0)


def test_no_file_no_env_gives_defaults() -> None:
    assert load_config(env={}) == FtrainConfig()


def test_empty_file_and_empty_section_set_nothing(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == FtrainConfig()
    assert load_config(write(tmp_path, "checkpoint:\n"), env={}) == FtrainConfig()


# --- precedence --------------------------------------------------------------------------------

def test_precedence_yaml_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "checkpoint:\n  every_steps: 10\n  retention:\n    keep_last: 7\n  dir: from_yaml\n")
    env = {"FTRAIN_CHECKPOINT_EVERY_STEPS": "20", "FTRAIN_CHECKPOINT_DIR": "from_env"}
    overrides = {"checkpoint.every_steps": 30, "checkpoint.dir": None}

    assert load_config(path, env={}).checkpoint.every_steps == 10
    assert load_config(path, env=env).checkpoint.every_steps == 20
    cfg = load_config(path, env=env, overrides=overrides).checkpoint
    assert cfg.every_steps == 30  # override beats env beats yaml
    assert cfg.dir == "from_env"  # a None override is skipped
    assert cfg.retention.keep_last == 7  # only the yaml sets it
    assert cfg.resume == "auto"  # nobody sets it: default


def test_config_env_var_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "checkpoint:\n  every_steps: 9\n")
    assert load_config(env={"FTRAIN_CONFIG": str(path)}).checkpoint.every_steps == 9
    # An explicit path wins over FTRAIN_CONFIG.
    other = write(tmp_path, "checkpoint:\n  every_steps: 1\n", "other.yaml")
    assert load_config(other, env={"FTRAIN_CONFIG": str(path)}).checkpoint.every_steps == 1


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST", "11")
    assert load_config().checkpoint.retention.keep_last == 11


def test_unrelated_ftrain_env_vars_are_ignored() -> None:
    env = {"FTRAIN_RANK": "3", "FTRAIN_CHECKPOINTS": "x", "ftrain_checkpoint_foo": "1"}
    assert load_config(env=env) == FtrainConfig()


def test_string_overrides_are_parsed() -> None:
    cfg = load_config(env={}, overrides={"checkpoint.every_seconds": "2.5"})
    assert cfg.checkpoint.every_seconds == 2.5


# --- values ------------------------------------------------------------------------------------

def test_ints_accepted_for_float_fields(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "checkpoint:\n  every_seconds: 300\n"), env={})
    assert cfg.checkpoint.every_seconds == 300.0
    assert isinstance(cfg.checkpoint.every_seconds, float)
    direct = CheckpointConfig(commit_timeout_seconds=5)
    assert isinstance(direct.commit_timeout_seconds, float)


def test_env_text_parsing() -> None:
    assert parse_text("k", "Yes", bool, "") is True
    assert parse_text("k", "0", bool, "") is False
    assert parse_text("k", "a, b,,c", list[str], "") == ["a", "b", "c"]
    assert parse_text("k", "", list[str], "") == []
    with pytest.raises(ConfigError, match="FTRAIN_X"):
        parse_text("k", "maybe", bool, " from FTRAIN_X")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every_steps": True}, "checkpoint.every_steps"),
    ({"every_seconds": False}, "checkpoint.every_seconds"),
    ({"every_steps": "10"}, "checkpoint.every_steps"),
    ({"every_steps": 1.5}, "checkpoint.every_steps"),
    ({"every_steps": -1}, "-1"),
    ({"every_seconds": -0.5}, "checkpoint.every_seconds"),
    ({"commit_timeout_seconds": 0}, "checkpoint.commit_timeout_seconds"),
    ({"resume": "sometimes"}, "'auto', 'required', 'never'"),
    ({"dir": ""}, "checkpoint.dir"),
])
def test_dataclass_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        CheckpointConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == 2


def test_a_nested_section_names_its_whole_path() -> None:
    with pytest.raises(ConfigError, match=re.escape("checkpoint.retention.keep_last: invalid value True")):
        RetentionConfig(keep_last=True)
    with pytest.raises(ConfigError, match=re.escape("checkpoint.remote: expected a RemoteConfig, got 's3://b'")):
        CheckpointConfig(remote="s3://b")  # type: ignore[arg-type]


# --- supervisor section ------------------------------------------------------------------------

def test_supervisor_defaults() -> None:
    cfg = FtrainConfig().supervisor
    assert (cfg.max_restarts, cfg.max_attempts_without_progress) == (3, 3)
    assert (cfg.backoff_seconds, cfg.backoff_max_seconds) == (1.0, 30.0)
    assert (cfg.grace_seconds, cfg.hang_timeout_seconds, cfg.startup_timeout_seconds) == (
        30.0, 300.0, 600.0)
    assert cfg.preemption_signals == ["SIGTERM", "SIGUSR1"]
    assert cfg.log_dir == ""
    # The list default is copied per instance, never shared.
    assert cfg.preemption_signals is not SupervisorConfig().preemption_signals


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_restarts": -1}, "supervisor.max_restarts"),
    ({"max_restarts": 1.0}, "supervisor.max_restarts"),
    ({"max_attempts_without_progress": -1}, "supervisor.max_attempts_without_progress"),
    ({"backoff_seconds": -0.1}, "supervisor.backoff_seconds"),
    ({"backoff_max_seconds": -1}, "supervisor.backoff_max_seconds"),
    ({"grace_seconds": 0}, "supervisor.grace_seconds"),
    ({"grace_seconds": -5}, "a value > 0"),
    ({"hang_timeout_seconds": -1}, "supervisor.hang_timeout_seconds"),
    ({"startup_timeout_seconds": 0}, "supervisor.startup_timeout_seconds"),
    ({"preemption_signals": "SIGTERM"}, "a list of strings"),
    ({"log_dir": None}, "supervisor.log_dir"),
])
def test_supervisor_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        SupervisorConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == 2


def test_supervisor_zero_disables_are_accepted() -> None:
    cfg = SupervisorConfig(max_restarts=0, max_attempts_without_progress=0, backoff_seconds=0,
                           backoff_max_seconds=0, hang_timeout_seconds=0, log_dir="/var/log/x")
    assert cfg.hang_timeout_seconds == 0.0 and isinstance(cfg.backoff_seconds, float)


@pytest.mark.parametrize("signals", [
    ["SIGTERM"], ["SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT"], ["SIGTERM", "SIGUSR1"],
])
def test_preemption_signals_accepted(signals: list[str]) -> None:
    assert SupervisorConfig(preemption_signals=signals).preemption_signals == signals


@pytest.mark.parametrize(("signals", "bad", "why"), [
    (["SIGKILL"], "'SIGKILL'", "cannot be caught"),
    (["SIGTERM", "SIGSTOP"], "'SIGSTOP'", "cannot be caught"),
    (["SIGTERM", "SIGUSR2"], "'SIGUSR2'", "dump stacks"),
    (["SIGTERM", "SIGFOO"], "'SIGFOO'", "not one of"),
    (["sigterm"], "'sigterm'", "not one of"),
    (["TERM"], "'TERM'", "not one of"),
    ([], "[]", "non-empty"),
])
def test_preemption_signals_rejected(signals: list[str], bad: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        SupervisorConfig(preemption_signals=signals)
    message = str(info.value)
    assert message.startswith("supervisor.preemption_signals: "), message
    assert bad in message and why in message, message
    assert "\n" not in message


def test_bad_signal_in_yaml_names_key_item_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "supervisor:\n  preemption_signals: [SIGTERM, SIGKILL]\n")
    err = config_error("supervisor.preemption_signals", path=path)
    assert str(path) in str(err) and "'SIGKILL'" in str(err)


def test_preemption_signals_from_env() -> None:
    env = {"FTRAIN_SUPERVISOR_PREEMPTION_SIGNALS": "SIGTERM,SIGUSR1"}
    assert load_config(env=env).supervisor.preemption_signals == ["SIGTERM", "SIGUSR1"]
    env = {"FTRAIN_SUPERVISOR_PREEMPTION_SIGNALS": " SIGUSR1 , SIGHUP "}
    assert load_config(env=env).supervisor.preemption_signals == ["SIGUSR1", "SIGHUP"]


@pytest.mark.parametrize(("env", "match"), [
    ({"FTRAIN_SUPERVISOR_PREEMPTION_SIGNALS": "SIGTERM,SIGUSR2"}, "'SIGUSR2'"),
    ({"FTRAIN_SUPERVISOR_PREEMPTION_SIGNALS": ""}, "non-empty"),
    ({"FTRAIN_SUPERVISOR_MAX_RESTARTS": "-1"}, "FTRAIN_SUPERVISOR_MAX_RESTARTS"),
    ({"FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "soon"}, "FTRAIN_SUPERVISOR_BACKOFF_SECONDS"),
    ({"FTRAIN_SUPERVISOR_GRACE_SECONDS": "0"}, "FTRAIN_SUPERVISOR_GRACE_SECONDS"),
    ({"FTRAIN_SUPERVISOR_MAX_RESTART": "1"}, "FTRAIN_SUPERVISOR_MAX_RESTARTS"),
])
def test_bad_supervisor_env(env: dict[str, str], match: str) -> None:
    config_error(match, env=env)


def test_supervisor_yaml_and_override(tmp_path: Path) -> None:
    path = write(tmp_path, "supervisor:\n  max_restarts: 10\n  log_dir: /logs\n")
    cfg = load_config(path, env={}, overrides={"supervisor.preemption_signals": "SIGUSR1"})
    assert cfg.supervisor.max_restarts == 10
    assert cfg.supervisor.log_dir == "/logs"
    assert cfg.supervisor.preemption_signals == ["SIGUSR1"]
    assert cfg.checkpoint == CheckpointConfig()


def test_root_rejects_non_section() -> None:
    with pytest.raises(ConfigError, match="checkpoint"):
        FtrainConfig(checkpoint={"dir": "x"})  # type: ignore[arg-type]


# --- errors from each layer --------------------------------------------------------------------

def test_unknown_yaml_key_names_key_file_and_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "checkpoint:\n  every_stpes: 3\n")
    err = config_error("checkpoint.every_stpes", path=path)
    assert str(path) in str(err)
    assert "every_steps" in str(err) and "retention." in str(err)  # its keys, then its sections
    nested = write(tmp_path, "checkpoint:\n  retention:\n    keep_lats: 3\n", "nested.yaml")
    err = config_error("unknown key checkpoint.retention.keep_lats", path=nested)
    assert "valid keys of checkpoint.retention: keep_last, keep_best" in str(err)


def test_unknown_yaml_section(tmp_path: Path) -> None:
    path = write(tmp_path, "chekpoint:\n  keep_last: 3\n")
    err = config_error("chekpoint", path=path)
    assert str(path) in str(err)


@pytest.mark.parametrize(("text", "message"), [
    ("checkpoint:\n  retention:\n    keep_last: true\n", "checkpoint.retention.keep_last"),
    ("checkpoint:\n  every_steps: ten\n", "checkpoint.every_steps"),
    ("checkpoint:\n  retention:\n    keep_last: -2\n", "checkpoint.retention.keep_last"),
    ("checkpoint:\n  resume: always\n", "checkpoint.resume"),
    ("checkpoint:\n  dir: ''\n", "checkpoint.dir"),
])
def test_bad_yaml_values_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    err = config_error(message, path=path)
    assert str(path) in str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "checkpoint: 5\n", "checkpoint: [1, 2]\n",
                                  "checkpoint:\n  retention: 5\n", "checkpoint:\n  lease: [1]\n"])
def test_non_mapping_names_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    config_error(str(path), path=path)


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "checkpoint:\n  keep_last: [3\n  dir: x\n")
    config_error(str(path), path=path)


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    config_error(str(path), path=path)
    config_error(str(path), env={"FTRAIN_CONFIG": str(path)})


# --- hostile files: each is one ConfigError line, never a traceback (issue 10) -------------------

def _bomb(levels: int = 9) -> str:
    """A "billion laughs" value: level k holds 9 aliases of level k-1, so it spells out to 9**levels items.

    The anchors are defined inside the value itself, so the loader reaches a real key with it.
    """
    items = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, levels)]
    return "supervisor:\n  preemption_signals: [" + ", ".join(items) + "]\n"


@pytest.mark.parametrize(("text", "match"), [
    ("[" * 100_000, "nested too deeply"),  # PyYAML recurses per level: RecursionError, not a YAMLError
    ("checkpoint:\n  dir: " + "{a: " * 100_000 + "\n", "nested too deeply"),
    ("".join(" " * i + f"k{i}:\n" for i in range(1200)), "nested too deeply"),  # block mappings, < 1 MiB
    ("checkpoint:\n  dir: 2001-13-01\n", "ValueError: month must be in 1..12"),  # escapes PyYAML raw
    (_bomb(), "preemption_signals: invalid value"),
    ("checkpoint:\n  dir: &me [*me]\n", "checkpoint.dir: invalid value"),  # contains itself
    ("checkpoint:\n  dir: " + "x" * (MAX_CONFIG_VALUE_CHARS + 1) + "\n", f"longer than {MAX_CONFIG_VALUE_CHARS}"),
], ids=["deep-flow-lists", "deep-flow-mappings", "deep-block-mappings", "bad-timestamp", "alias-bomb",
        "self-containing", "long-value"])
def test_hostile_yaml_is_one_config_error_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    assert len(text.encode()) <= MAX_CONFIG_BYTES  # each is refused for what it holds, not for its size
    path = write(tmp_path, text)
    err = config_error(match, path=path)
    assert str(path) in str(err) and len(str(err)) < 1000


def test_alias_bomb_is_refused_without_spelling_it_out(tmp_path: Path) -> None:
    # 9**9 = 387 million "lol"s if printed: the error must come from the size bound, not from repr().
    path = write(tmp_path, _bomb())
    err = config_error("supervisor.preemption_signals: invalid value", path=path)
    assert f"longer than {MAX_CONFIG_VALUE_CHARS} characters" in str(err) and "lol" not in str(err)
    assert "expected a list of strings" in str(err)


def test_shared_values_that_stay_small_still_load(tmp_path: Path) -> None:
    # Aliases themselves are fine: only a value that multiplies past the bound is refused.
    path = write(tmp_path, "supervisor:\n  log_dir: &d logs\n  preemption_signals: &s [SIGTERM]\n"
                           "checkpoint:\n  dir: *d\n")
    cfg = load_config(path, env={})
    assert cfg.checkpoint.dir == "logs" and cfg.supervisor.preemption_signals == ["SIGTERM"]


def test_config_file_size_limit(tmp_path: Path) -> None:
    head = "checkpoint:\n  every_steps: 4\n"
    exact = write(tmp_path, head + "#" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n", "exact.yaml")
    assert exact.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(exact, env={}).checkpoint.every_steps == 4  # the limit itself is allowed
    big = write(tmp_path, head + "#" * (MAX_CONFIG_BYTES - len(head)) + "\n", "big.yaml")
    err = config_error(f"larger than the {MAX_CONFIG_BYTES} byte (1 MiB) limit", path=big)
    assert str(big) in str(err)


@pytest.mark.parametrize("kind", ["deep", "bomb", "big"])
def test_launch_with_a_hostile_config_fails_before_starting_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    import ftrain.supervisor.supervisor as supervisor
    from ftrain.cli import main
    from ftrain.signals import EARLY_SIGNALS

    text = {"deep": "[" * 100_000, "bomb": _bomb(), "big": "#" * (MAX_CONFIG_BYTES + 1)}[kind]
    path = write(tmp_path, text)
    started: list[object] = []
    monkeypatch.setattr(supervisor, "Supervisor", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)  # the default checkpoint dir would appear here if launch went on
    saved = {name: signal.getsignal(getattr(signal, name)) for name in EARLY_SIGNALS}
    try:  # launch installs its early preemption handlers first; they must not outlive this test
        code = main(["launch", "--config", str(path), str(EXAMPLE)])
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("ftrain: error: ") and str(path) in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert started == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.parametrize(("env", "var"), [
    ({"FTRAIN_CHECKPOINT_EVERY_STEPS": "often"}, "FTRAIN_CHECKPOINT_EVERY_STEPS"),
    ({"FTRAIN_CHECKPOINT_KEEP_LAST": "-1"}, "FTRAIN_CHECKPOINT_KEEP_LAST"),
    ({"FTRAIN_CHECKPOINT_EVERY_SECONDS": "true"}, "FTRAIN_CHECKPOINT_EVERY_SECONDS"),
    ({"FTRAIN_CHECKPOINT_RESUME": "yes"}, "FTRAIN_CHECKPOINT_RESUME"),
    ({"FTRAIN_CHECKPOINT_DIR": ""}, "FTRAIN_CHECKPOINT_DIR"),
])
def test_bad_env_value_names_variable(env: dict[str, str], var: str) -> None:
    config_error(var, env=env)


def test_unknown_env_var_in_known_section() -> None:
    err = config_error("FTRAIN_CHECKPOINT_FOO", env={"FTRAIN_CHECKPOINT_FOO": "1"})
    assert "FTRAIN_CHECKPOINT_EVERY_STEPS" in str(err)  # lists the valid names, nested sections' too
    assert "FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST" in str(err)
    config_error("FTRAIN_CHECKPOINT_REMOTE_URI", env={"FTRAIN_CHECKPOINT_REMOTE_URI": "s3://b"})


@pytest.mark.parametrize("key", ["checkpoint.foo", "checkpoint", "nosuch.keep_last", "checkpoint.retention",
                                 "checkpoint.retention.foo"])
def test_unknown_override_key(key: str) -> None:
    config_error(key, overrides={key: 1})


def test_bad_override_value() -> None:
    config_error("checkpoint.retention.keep_last", overrides={"checkpoint.retention.keep_last": -3})


# --- exporting ---------------------------------------------------------------------------------

def test_config_to_env_round_trip() -> None:
    original = FtrainConfig(checkpoint=CheckpointConfig(
        dir="/tmp/run 1/ckpt", every_steps=17, every_seconds=0.1, retention=RetentionConfig(keep_last=0),
        resume="required", commit_timeout_seconds=1e9 + 0.5, remote=RemoteConfig(url="s3://b/p", retries=2)),
        supervisor=SupervisorConfig(
        max_restarts=0, max_attempts_without_progress=7, backoff_seconds=0.25,
        backoff_max_seconds=1e-3, grace_seconds=12.5, hang_timeout_seconds=0,
        startup_timeout_seconds=3.3, preemption_signals=["SIGUSR1", "SIGTERM", "SIGHUP"],
        log_dir="/tmp/run 1/logs", notices=NoticesConfig(sources=["aws", "drain"])),
        data=DataConfig(on_uneven_batch="nearest"))
    assert original != FtrainConfig()
    assert original.supervisor != SupervisorConfig()
    env = config_to_env(original)
    assert set(env) == {"FTRAIN_" + key.replace(".", "_").upper() for key in config_keys()}
    assert all(isinstance(value, str) for value in env.values())
    assert env["FTRAIN_SUPERVISOR_PREEMPTION_SIGNALS"] == "SIGUSR1,SIGTERM,SIGHUP"
    assert env["FTRAIN_SUPERVISOR_LOG_DIR"] == "/tmp/run 1/logs"
    assert env["FTRAIN_CHECKPOINT_REMOTE_URL"] == "s3://b/p" and env["FTRAIN_SUPERVISOR_NOTICES_SOURCES"] == "aws,drain"
    assert load_config(env=env) == original
    # Defaults too, including the empty log_dir.
    assert load_config(env=config_to_env(FtrainConfig())) == FtrainConfig()


def test_config_to_dict() -> None:
    cfg = FtrainConfig(checkpoint=CheckpointConfig(retention=RetentionConfig(keep_last=5)))
    as_dict = config_to_dict(cfg)
    assert as_dict["checkpoint"]["retention"] == {"keep_last": 5, "keep_best": 1}
    assert sorted(leaves(as_dict)) == sorted(config_keys())
    # What a manifest records reads back through the overrides, key by key.
    assert load_config(env={}, overrides=dict(zip(leaves(as_dict), _values(as_dict), strict=True))) == cfg


def _values(data: dict[str, Any]) -> list[Any]:
    """The leaf values of a nested mapping, in the order of :func:`leaves`."""
    out: list[Any] = []
    for value in data.values():
        out += _values(value) if isinstance(value, dict) else [value]
    return out


def assert_frozen(obj: object) -> None:
    """``obj`` is an instance of a frozen dataclass (every dataclass it inherits from too): no field assignable."""
    cls = type(obj)
    assert dataclasses.is_dataclass(cls), f"{cls.__name__} is not a dataclass"
    for f in dataclasses.fields(cls):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, f.name, getattr(obj, f.name))
    owners = [c for c in cls.__mro__ if "__dataclass_params__" in vars(c)]
    assert all(c.__dataclass_params__.frozen for c in owners), f"{cls.__name__}: not frozen: {owners}"


def test_configs_are_immutable() -> None:
    config = FtrainConfig()
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert {name: type(s) for name, s in sections.items()} == {
        "checkpoint": CheckpointConfig, "data": DataConfig, "early_stopping": EarlyStoppingConfig,
        "supervisor": SupervisorConfig}
    nested = [config.checkpoint.retention, config.checkpoint.selection, config.checkpoint.lease,
              config.checkpoint.remote, config.supervisor.notices]
    for section in (config, *sections.values(), *nested):
        assert_frozen(section)


def test_assert_frozen_rejects_what_is_not_a_frozen_dataclass() -> None:
    @dataclasses.dataclass
    class Mutable:
        keep_last: int = 3

    @dataclasses.dataclass
    class ReadOnlyByHand:  # refuses assignment, but is no frozen dataclass
        keep_last: int = 3

        def __setattr__(self, name: str, value: object) -> None:
            raise dataclasses.FrozenInstanceError(name)

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        keep_last: int = 3

    assert_frozen(Frozen())
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        assert_frozen(Mutable())
    by_hand = object.__new__(ReadOnlyByHand)
    object.__setattr__(by_hand, "keep_last", 3)
    with pytest.raises(AssertionError, match="not frozen"):
        assert_frozen(by_hand)
    with pytest.raises(AssertionError, match="not a dataclass"):
        assert_frozen(object())


def test_finetune_yaml() -> None:
    cfg = load_config(CONFIGS / "finetune.yaml", env={})
    ck = cfg.checkpoint
    assert ck.selection.monitor == "val_loss" and ck.retention.keep_best == 2 and ck.trainable_only
    assert cfg.early_stopping.patience == 5 and cfg.early_stopping.min_delta == 0.001


@pytest.mark.parametrize("url, why", [
    ("s3:/bucket/run", "no SCHEME://"), ("/shared/ckpt", "no SCHEME://"), ("s3://", "nothing follows"),
    ("s3:///run", "no bucket name"), ("s3://bucket /run", "white space"), ("3s://bucket", "no SCHEME://"),
])
def test_a_malformed_remote_url_is_a_config_error_naming_it(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides={"checkpoint.remote.url": url})
    assert f"checkpoint.remote.url: invalid value {url!r}" in str(caught.value) and why in str(caught.value)
    assert caught.value.permanent and caught.value.exit_code == 2


@pytest.mark.parametrize("url", ["", "s3://bucket", "s3://bucket/runs/exp", "file:///shared/ckpt", "gs://b/p",
                                 "az://container/p", "s3a://bucket/p"])
def test_well_formed_remote_urls_load(url: str) -> None:
    assert load_config(None, overrides={"checkpoint.remote.url": url}).checkpoint.remote.url == url
