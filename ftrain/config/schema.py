"""Shared contract: every configuration key, read off the section dataclasses: its path, type, rule and names.

A key is a leaf field: ``checkpoint.remote.url`` is the field ``url`` of the section at ``checkpoint.remote``.
Its environment variable is ``FTRAIN_`` and the path's parts joined by ``_``, upper-cased.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

from ftrain.config.sections import FtrainConfig, _fields_of, _Section, paths
from ftrain.config.values import check

ENV_PREFIX = "FTRAIN_"


class Key(NamedTuple):
    """One configuration key and everything needed to load, check and document it."""

    path: tuple[str, ...]
    type: Any
    field: dataclasses.Field[Any]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env_var(self) -> str:
        return env_var(self.path)

    @property
    def help(self) -> str:
        return str(self.field.metadata["help"])

    @property
    def internal(self) -> bool:
        """A key that exists for tests only, left out of the user-facing reference."""
        return bool(self.field.metadata["internal"])

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` validated and normalised for this key (see :func:`ftrain.config.values.check`)."""
        return check(self.dotted, value, self.type, self.field.metadata["rule"], where)

    def get(self, cfg: FtrainConfig) -> Any:
        value: Any = cfg
        for part in self.path:
            value = getattr(value, part)
        return value


def env_var(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Section)


def fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """``(field, resolved type)`` of a section class or of FtrainConfig (whose fields are all sections)."""
    return _fields_of(cls)


@functools.cache
def all_keys() -> tuple[Key, ...]:
    """Every key in declaration order, a section's own keys before those of its nested sections."""
    return tuple(Key((*path.split("."), f.name), tp, f) for path, cls in section_paths().items()
                 for f, tp in fields(cls) if not is_section(tp))


@functools.cache
def by_dotted() -> dict[str, Key]:
    return {key.dotted: key for key in all_keys()}


@functools.cache
def section_paths() -> dict[str, type]:
    """Every section's dotted path -> its class, each section before the ones nested in it."""
    return {path: cls for cls, path in paths().items()}


def names_in(section: str) -> list[str]:
    """The names one level down in ``section`` ('' for the root): its keys, then its sections (with a dot)."""
    cls = section_paths()[section] if section else FtrainConfig
    return [f.name + ("." if is_section(tp) else "") for f, tp in fields(cls)]


def build(values: dict[str, Any]) -> FtrainConfig:
    """The configuration from checked values by dotted key; absent keys take their defaults."""
    def make(cls: type, prefix: str) -> Any:
        kwargs = {}
        for f, tp in fields(cls):
            dotted = prefix + f.name
            if is_section(tp):
                kwargs[f.name] = make(tp, dotted + ".")
            elif dotted in values:
                kwargs[f.name] = values[dotted]
        return cls(**kwargs)
    cfg: FtrainConfig = make(FtrainConfig, "")
    return cfg
