"""Freeze parts of a model and build optimizer parameter groups by name pattern.

Targets are ``fnmatch`` patterns over parameter names (case-sensitive; ``*``
also crosses dots, so ``"backbone.*"`` covers every parameter below
``backbone``) or submodule objects of the model.

Invariants:

* A pattern or module that selects no parameter raises :class:`FtrainError`
  naming it: a typo must never silently freeze (or re-weight) nothing.
* All targets are resolved before anything changes, so a failing call leaves
  every ``requires_grad`` flag as it was.
* A tied (shared) parameter is one parameter: a pattern may select it by any
  of its names, it appears in one optimizer group only, and name lists
  (:func:`freeze`'s result, :func:`frozen_names`) give every name it has, as
  ``ftrain.session.trainable.frozen_names`` does, so they round-trip through it.

Thread-safety: :func:`freeze`/:func:`unfreeze` mutate ``requires_grad``; call
them between steps, not while another thread runs backward.
"""
from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from ftrain.errors import FtrainError
from ftrain.session.trainable import frozen_names

__all__ = ["DEFAULT_GROUP", "freeze", "frozen_names", "param_groups", "unfreeze"]

DEFAULT_GROUP = "default"


def freeze(model: nn.Module, *targets: str | nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on the parameters selected by ``targets``; return all their names, model order."""
    return _set_requires_grad(model, targets, False, "freeze")


def unfreeze(model: nn.Module, *targets: str | nn.Module) -> list[str]:
    """Set ``requires_grad=True`` on the parameters selected by ``targets``; return all their names, model order."""
    return _set_requires_grad(model, targets, True, "unfreeze")


def param_groups(model: nn.Module, rules: Mapping[str, Mapping[str, Any] | float], *, include_frozen: bool = False,
                 **defaults: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``torch.optim.AdamW(param_groups(model, {"head.*": 1e-3}), lr=1e-4)``.

    ``rules`` maps a pattern to the group's options (a number ``x`` means
    ``{"lr": x}``). Each parameter joins the group of the *first* rule (in dict
    order) that matches one of its names; the rest form a group named
    ``"default"``. ``defaults`` are options of every group, which a rule's own
    options override (with no ``defaults``, the optimizer's defaults apply).

    Each group is ``{"params": [...], "name": pattern or "default", **options}``;
    torch optimizers keep the extra ``"name"`` key through ``state_dict()``.
    Groups come in rule order with ``"default"`` last; parameters within a group
    in model order. Frozen parameters are left out unless ``include_frozen``
    (for gradual unfreezing, the optimizer must know them from the start). Empty
    groups are dropped, but a rule that matches no parameter, or only
    parameters an earlier rule already took, raises :class:`FtrainError`.
    """
    for reserved in ("params", "name"):
        if reserved in defaults:
            raise FtrainError(f"param_groups(): {reserved!r} is set by param_groups itself, not by an option")
    options = {pattern: _rule_options(pattern, value) for pattern, value in rules.items()}
    params = _parameters(model)
    groups: dict[str, list[nn.Parameter]] = {pattern: [] for pattern in options}
    rest: list[nn.Parameter] = []  # not in `groups`: a rule may itself be spelled "default"
    hit = dict.fromkeys(options, False)  # the pattern matched some name (the claim may go to an earlier rule)
    claimed = dict.fromkeys(options, False)  # the rule got at least one parameter, frozen ones included
    for _, param, names in params:
        owner: str | None = None
        for pattern in options:
            if any(fnmatchcase(n, pattern) for n in names):
                hit[pattern] = True
                if owner is None:
                    owner = pattern
                    claimed[pattern] = True
        if include_frozen or param.requires_grad:
            (rest if owner is None else groups[owner]).append(param)
    for pattern in options:
        if not hit[pattern]:
            raise _no_match(model, params, repr(pattern), "param_groups")
        if not claimed[pattern]:
            raise FtrainError(f"param_groups(): rule {pattern!r} gets no parameter because earlier rules match all "
                              "of its parameters first (first match wins): put more specific patterns first")
    out = [{"params": members, "name": name, **defaults, **options[name]}
           for name, members in groups.items() if members]
    if rest:
        out.append({"params": rest, "name": DEFAULT_GROUP, **defaults})
    return out


# ------------------------------------------------------------------ helpers
def _parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, list[str]]]:
    """``(first name, parameter, all its names)`` per distinct parameter, in model order."""
    by_id: dict[int, tuple[str, nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        entry = by_id.setdefault(id(param), (name, param, []))
        entry[2].append(name)
    return list(by_id.values())


def _select(model: nn.Module, targets: tuple[str | nn.Module, ...], verb: str) -> list[nn.Parameter]:
    """The distinct parameters that ``targets`` select, in model order; raises if any target selects none."""
    if not targets:
        raise FtrainError(f"{verb}() needs at least one parameter-name pattern or submodule")
    params = _parameters(model)
    chosen: set[int] = set()
    for target in targets:
        if isinstance(target, str):
            ids = {id(p) for _, p, names in params if any(fnmatchcase(n, target) for n in names)}
            label = repr(target)
        elif isinstance(target, nn.Module):
            if not any(m is target for m in model.modules()):
                raise FtrainError(f"{verb}(): the {type(target).__name__} passed is not a submodule of this "
                                  f"{type(model).__name__}")
            ids = {id(p) for p in target.parameters()}
            label = f"submodule {type(target).__name__}"
        else:
            raise FtrainError(f"{verb}(): targets are parameter-name patterns (str) or submodules, "
                              f"not a {type(target).__name__}")
        if not ids:
            raise _no_match(model, params, label, verb)
        chosen |= ids
    return [p for _, p, _ in params if id(p) in chosen]


def _set_requires_grad(model: nn.Module, targets: tuple[str | nn.Module, ...], flag: bool, verb: str) -> list[str]:
    selected = _select(model, targets, verb)  # resolve everything first: a bad target changes nothing
    for param in selected:
        param.requires_grad_(flag)
    ids = {id(p) for p in selected}
    return [name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]


def _rule_options(pattern: str, value: Mapping[str, Any] | float) -> dict[str, Any]:
    if not isinstance(pattern, str):
        raise FtrainError(f"param_groups(): rule keys are parameter-name patterns (str), not {pattern!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"lr": float(value)}
    if not isinstance(value, Mapping):
        raise FtrainError(f"param_groups(): rule {pattern!r} maps to a {type(value).__name__}; expected a learning "
                          "rate (number) or a dict of optimizer options")
    reserved = {"params", "name"} & set(value)
    if reserved:
        raise FtrainError(f"param_groups(): rule {pattern!r} sets {sorted(reserved)}, which param_groups sets itself")
    return dict(value)


def _no_match(model: nn.Module, params: list[tuple[str, nn.Parameter, list[str]]], label: str,
              verb: str) -> FtrainError:
    names = [n for _, _, aliases in params for n in aliases]
    sample = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    return FtrainError(f"{verb}(): {label} matches no parameter of {type(model).__name__}; "
                       f"its parameters are named like: {sample or '(it has none)'}")
