"""Shared contract: the configuration loaded from its layers, and written back out for the workers.

Precedence, lowest to highest (a later layer overrides an earlier one, key by key):

1. dataclass defaults (documented in ``configs/default.yaml``);
2. the YAML file (``path``, else the file named by ``FTRAIN_CONFIG``);
3. environment variables ``FTRAIN_<PATH>``, e.g. ``FTRAIN_CHECKPOINT_RETENTION_KEEP_LAST=5``;
4. ``overrides``: command-line flags as dotted keys, e.g. ``{"checkpoint.every_steps": 100}``.

Every mistake (unknown key, bad value, unreadable file) raises :class:`ConfigError` with a one-line message
naming the key and where it came from. A renamed key (``renamed.py``) works, with one deprecation line.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import yaml

from ftrain import envvars
from ftrain.config import schema
from ftrain.config.renamed import RENAMED, RENAMED_ENV, warn_renamed
from ftrain.config.sections import FtrainConfig
from ftrain.config.values import TYPE_NAMES, format_text, parse_text
from ftrain.errors import ConfigError

#: Config files larger than this are refused before parsing (docs/configuration.md). A real one is a few
#: KB; the bound keeps PyYAML's pure-Python parser to a fraction of a second and caps what aliases can expand.
MAX_CONFIG_BYTES = 1 << 20
#: A single value spelled out longer than this is refused (docs/configuration.md): the longest real one is a
#: path (at most 4096 bytes on Linux); the bound stops YAML aliases from multiplying a value (see below).
MAX_CONFIG_VALUE_CHARS = 1 << 16


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> FtrainConfig:
    """Build the configuration from defaults, a YAML file, the environment and overrides.

    ``path`` None means the file named by ``FTRAIN_CONFIG`` (in ``env``), else no file.
    ``env`` None means ``os.environ``. ``overrides`` maps dotted keys to values; None
    values are skipped so unset argparse flags do not override, and string values are
    parsed like environment variables (for generic ``--set key=value`` flags).
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(envvars.CONFIG) or None
    values: dict[str, Any] = {}  # dotted key -> checked value; later layers overwrite
    if path is not None:
        values.update(_read_yaml(os.fspath(path)))
    values.update(_read_env(env))
    values.update(_read_overrides(overrides or {}))
    return schema.build(values)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)  # bounded: a huge file (or /dev/zero) is never read whole
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than the {MAX_CONFIG_BYTES} byte (1 MiB) limit; "
                          "a config file holds a few settings")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        # PyYAML messages span several lines; keep the one-line promise.
        detail = " ".join(str(err).split())
        raise ConfigError(f"invalid YAML in config file {path}: {detail}") from None
    except RecursionError:  # PyYAML's parser and constructor recurse once per level: a few hundred `[` suffice
        raise ConfigError(f"invalid YAML in config file {path}: nested too deeply") from None
    except MemoryError:
        raise ConfigError(f"invalid YAML in config file {path}: out of memory while parsing it") from None
    except Exception as err:  # PyYAML's constructors let some errors out raw (a timestamp with month 13: ValueError)
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"invalid YAML in config file {path}: {type(err).__name__}: {detail}") from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections "
                          f"({', '.join(schema.names_in(''))}) at top level, got {type(data).__name__}")
    out: dict[str, Any] = {}
    _walk_yaml(out, {}, data, "", path)
    return out


def _walk_yaml(out: dict[str, Any], written: dict[str, str], mapping: dict[Any, Any], section: str,
               path: str) -> None:
    """Check the keys of one section's mapping into ``out``; ``written``: new key -> the key as the file wrote it."""
    sections = schema.section_paths()
    for name, value in mapping.items():
        dotted = f"{section}.{name}" if section else str(name)
        if dotted in sections and (isinstance(value, dict) or value is None):
            if value is not None:  # None: a section whose keys are all commented out
                _walk_yaml(out, written, value, dotted, path)
            continue
        where = f" in {path}"
        target = _current(dotted, where)
        key = schema.by_dotted().get(target)
        if key is None:
            if dotted in sections:
                raise ConfigError(f"config file {path}: section {dotted!r} must be a mapping of keys, "
                                  f"got {type(value).__name__}")
            if not section:
                raise ConfigError(f"unknown section {dotted!r} in {path}; "
                                  f"valid sections: {', '.join(schema.names_in(''))}")
            raise ConfigError(f"unknown key {dotted} in {path}; "
                              f"valid keys of {section}: {', '.join(schema.names_in(section))}")
        if target in written and written[target] != dotted:
            raise ConfigError(f"{path} sets both {written[target]} and {dotted}, the same key (renamed); "
                              f"keep {target}")
        written[target] = dotted
        if _spelled_out_exceeds(value, MAX_CONFIG_VALUE_CHARS):
            # Checked before key.check, whose error message would print the value in full.
            raise ConfigError(f"{target}: invalid value{where}: longer than {MAX_CONFIG_VALUE_CHARS} "
                              f"characters written out (YAML aliases?); expected {TYPE_NAMES[key.type]}")
        out[target] = key.check(value, where)


def _current(dotted: str, where: str) -> str:
    """The key ``dotted`` names now: itself, or (with its deprecation line) what a renamed key became."""
    if dotted not in RENAMED:
        return dotted
    warn_renamed(dotted, RENAMED[dotted], where)
    return RENAMED[dotted]


def _spelled_out_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` written out in full (one per item plus each string's length) is longer than ``limit``.

    YAML aliases let a small file load as a structure that shares its parts, or contains itself ("billion
    laughs"): loading stays linear, but printing it would write out every copy. Iterative, and stops as soon
    as the budget is spent, so the walk itself is bounded too.
    """
    budget = limit
    stack = [value]
    while stack:
        v = stack.pop()
        budget -= 1 + (len(v) if isinstance(v, (str, bytes)) else 0)
        if budget < 0:
            return True
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set)):
            stack += v
    return False


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    by_var = {key.env_var: key for key in schema.all_keys()}
    tops = schema.names_in("")
    prefixes = {schema.env_var((top.rstrip("."),)) + "_": top.rstrip(".") for top in tops}
    out: dict[str, Any] = {}
    old_values: dict[str, tuple[str, Any]] = {}  # new dotted key -> (old variable, its value)
    for var, text in env.items():
        key = by_var.get(var)
        if key is None and var in RENAMED_ENV:
            key = schema.by_dotted()[RENAMED_ENV[var]]
            warn_renamed(var, key.env_var, "")
            old_values[key.dotted] = (var, key.check(parse_text(key.dotted, text, key.type, f" from {var}"),
                                                     f" from {var}"))
            continue
        if key is None:
            # Only names under a known section are ours to police: other modules use FTRAIN_*.
            section = next((s for p, s in prefixes.items() if var.startswith(p)), None)
            if section is not None:
                valid = ", ".join(k.env_var for k in schema.all_keys() if k.path[0] == section)
                raise ConfigError(f"unknown environment variable {var}; "
                                  f"valid {section} variables: {valid}")
            continue
        where = f" from {var}"
        out[key.dotted] = key.check(parse_text(key.dotted, text, key.type, where), where)
    for dotted, (var, value) in old_values.items():
        if dotted in out and out[dotted] != value:
            # Equal values are fine: `ftrain launch` passes its workers the new variable beside an old one that
            # the user's shell may still export.
            raise ConfigError(f"{var} and {schema.by_dotted()[dotted].env_var} set different values for the "
                              f"same key (renamed); keep {schema.by_dotted()[dotted].env_var}")
        out.setdefault(dotted, value)
    return out


def _read_overrides(overrides: Mapping[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        where = " from command-line override"
        target = _current(dotted, where)
        key = schema.by_dotted().get(target)
        if key is None:
            raise ConfigError(f"unknown override key {dotted!r}; valid keys: {', '.join(config_keys())}")
        if isinstance(value, str):
            value = parse_text(key.dotted, value, key.type, where)
        out[target] = key.check(value, where)
    return out


def config_to_dict(cfg: FtrainConfig) -> dict[str, Any]:
    """The configuration as nested plain dicts (section -> key or nested section -> ...), e.g. for logging."""
    return dataclasses.asdict(cfg)


def config_to_env(cfg: FtrainConfig) -> dict[str, str]:
    """Every key as its ``FTRAIN_<PATH>`` variable; ``load_config(env=...)`` reads it back.

    A launcher passes this to worker processes so they see exactly its resolved config.
    (List items containing commas cannot round-trip: commas separate items.)
    """
    return {key.env_var: format_text(key.get(cfg)) for key in schema.all_keys()}


def config_keys() -> list[str]:
    """Every dotted key, e.g. ``checkpoint.every_steps``, in declaration order (nested sections last)."""
    return [key.dotted for key in schema.all_keys()]


def describe_keys(*, internal: bool = True) -> list[tuple[str, object, str]]:
    """``(dotted key, default, one-line help)`` for every key, for ``--help`` and docs; ``internal=False`` leaves
    out the keys that exist for tests."""
    defaults = FtrainConfig()
    return [(key.dotted, key.get(defaults), key.help) for key in schema.all_keys() if internal or not key.internal]
