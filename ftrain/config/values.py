"""Shared contract: one configuration value: its rules, its check, and its text form.

The value rules every key's field carries (:data:`Rule`), :func:`check` (the type and rule of one value, as a
one-line error), and the text form of environment variables and ``--set`` flags (:func:`parse_text` and
:func:`format_text`, inverses of each other). Nothing here knows which keys exist: that is ``sections.py``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ftrain.errors import ConfigError
from ftrain.signals import CATCHABLE_PREEMPTION_SIGNALS, STACK_DUMP_SIGNAL

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
TYPE_NAMES: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list[str]: "a list of strings",
}

#: A value rule: a predicate and the phrase saying what it allows. The phrase may be a
#: function of the rejected value, so a list rule can name the offending item.
Rule = tuple[Callable[[Any], bool], str | Callable[[Any], str]]
NON_NEGATIVE: Rule = (lambda v: v >= 0, "a value >= 0")
POSITIVE: Rule = (lambda v: v > 0, "a value > 0")
NON_EMPTY: Rule = (bool, "a non-empty string")


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


def _remote_problem(url: str) -> str | None:
    """Why ``url`` cannot be a ``checkpoint.remote.url``, or None. Caught here, before torchrun starts: a typo
    such as ``s3:/bucket/run`` would otherwise be taken for a local directory named ``s3:``."""
    if not url:
        return None
    expect = "empty, or a URL such as s3://BUCKET/PREFIX or file:///shared/ckpt"
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return f"{expect} (this has no SCHEME:// at its start: check the slashes)"
    if not rest.strip("/"):
        return f"{expect} (nothing follows {scheme}://)"
    if scheme.lower() in ("s3", "s3a") and (not rest.split("/", 1)[0] or rest.startswith("/")):
        return f"{expect} (no bucket name after {scheme}://)"
    if any(c.isspace() for c in url):
        return f"{expect} (it holds white space)"
    return None


REMOTE_URL: Rule = (lambda v: _remote_problem(v) is None, lambda v: _remote_problem(v) or "")


HTTP_URL: Rule = (lambda v: v.startswith(("http://", "https://")) and len(v) > len("https://"),
                   "an http:// or https:// URL")
MODULE_NAMES: Rule = (lambda v: all(all(p.isidentifier() for p in m.removeprefix("-").split(".")) for m in v),
                       "a list of module names, such as torch, numpy.random or -wandb")


def distinct_among(choices: tuple[str, ...], what: str) -> Rule:
    """A list of ``what`` drawn from ``choices``, each at most once; the message names the first offender."""
    def problem(names: list[str]) -> str | None:
        for name in names:
            if name not in choices:
                return f"a list of {what} among {', '.join(choices)} ({name!r} is not one of them)"
        if len(set(names)) != len(names):
            return f"a list of {what} among {', '.join(choices)}, each at most once"
        return None
    return (lambda v: problem(v) is None, lambda v: problem(v) or "")


#: SIGKILL and SIGSTOP cannot be caught; SIGUSR2 is taken by ftrain's stack dumps, so a preemption on it
#: would be misread (see ``signals.py``).
PREEMPTION_SIGNALS = CATCHABLE_PREEMPTION_SIGNALS


def _signal_problem(names: list[str]) -> str | None:
    """Why ``names`` is not a valid ``preemption_signals`` list, or None if it is."""
    if not names:
        return "a non-empty list of signal names"
    allowed = "signal names among " + ", ".join(PREEMPTION_SIGNALS)
    for name in names:
        if name == STACK_DUMP_SIGNAL:
            return f"{allowed} ({name!r} is reserved: ftrain uses it to dump stacks)"
        if name in ("SIGKILL", "SIGSTOP"):
            return f"{allowed} ({name!r} cannot be caught, so no save could run)"
        if name not in PREEMPTION_SIGNALS:
            return f"{allowed} ({name!r} is not one of them)"
    return None


SIGNAL_NAMES: Rule = (lambda v: _signal_problem(v) is None,
                       lambda v: _signal_problem(v) or "")


def check(key: str, value: Any, tp: Any, rule: Rule | None, where: str = "") -> Any:
    """Return ``value`` normalised to ``tp`` or raise ConfigError naming ``key``.

    ``where`` (e.g. " in run.yaml") says which layer supplied the value.
    """
    def fail(allowed: str) -> ConfigError:
        return ConfigError(f"{key}: invalid value {value!r}{where}; expected {allowed}")

    # bool is an int subclass, but True for "every_steps" is always a mistake.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and is_number:
        value = float(value)
    elif tp == list[str]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise fail(TYPE_NAMES[tp])
        value = list(value)
    elif not isinstance(value, tp) or (tp is int and not is_number):
        raise fail(TYPE_NAMES[tp])
    if rule is not None and not rule[0](value):
        raise fail(rule[1] if isinstance(rule[1], str) else rule[1](value))
    return value


def parse_text(key: str, text: str, tp: Any, where: str) -> Any:
    """Parse a string (env var or CLI text) into ``tp``; the inverse of :func:`format_text`."""
    word = text.strip().lower()
    if tp is bool and word in _TRUE + _FALSE:
        return word in _TRUE
    if tp == list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]
    if tp is str:
        return text
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            pass
    raise ConfigError(f"{key}: invalid value {text!r}{where}; expected {TYPE_NAMES[tp]}")


def format_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)  # str(float) round-trips exactly
