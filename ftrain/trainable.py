"""Which parameters of a module train, and trainable-only state: what a fine-tune checkpoint needs.

``requires_grad`` is not part of ``state_dict()``, so without help a resumed run
freezes whatever its script freezes at start: a run that unfroze its backbone at
step 1000 (gradual unfreezing) and restarts at step 1500 would silently train
with a frozen backbone. The session records the frozen parameter names in every
checkpoint and re-applies them on restore.

With ``checkpoint.trainable_only`` a module's frozen parameters are left out of
the checkpoint (a LoRA run does not copy its multi-GB base on every save). They
are referenced by a fingerprint: XXH3-128 over each frozen parameter's name,
dtype, shape and bytes, in name order. On resume the script loads the base from
its original source, and the fingerprint must match before the trainable part
is restored on top.

Functions only; thread-safe as long as the module is not being modified.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ftrain.checkpoint import checksum, codec
from ftrain.errors import StateMismatch

log = logging.getLogger("ftrain")

_HASH_CHUNK = 64 << 20  # GPU tensors are hashed through bounded host copies


def frozen_names(module: nn.Module) -> list[str]:
    """Sorted names of the parameters with ``requires_grad`` false (every name of a shared parameter)."""
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad)


def apply_frozen(module: nn.Module, frozen: Iterable[str], what: str) -> list[str]:
    """Set ``requires_grad`` so that exactly ``frozen`` are frozen; return the names that changed.

    ``what`` names the module in errors. A name the module does not have means
    the checkpoint is for another architecture: :class:`StateMismatch`.
    """
    want = set(frozen)
    params = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(want - params.keys())
    if unknown:
        raise StateMismatch(f"{what}: the checkpoint freezes parameter(s) the module does not have: {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}; is this the same architecture?")
    changed = []
    for name, p in params.items():
        trainable = name not in want
        if p.requires_grad != trainable:
            p.requires_grad_(trainable)
            changed.append(name)
    return changed


def fingerprint(module: nn.Module, names: Iterable[str]) -> str:
    """XXH3-128 of the named parameters (name, dtype, shape, bytes; in name order), as hex."""
    params = dict(module.named_parameters(remove_duplicate=False))
    h = checksum.Hasher()
    for name in sorted(set(names)):
        t = params[name].detach()
        h.update(f"{name}|{codec.dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        flat = t.reshape(-1)
        if flat.device.type == "cpu":
            h.update(codec.tensor_bytes(flat))
            continue
        step = max(1, _HASH_CHUNK // max(1, t.element_size()))
        for start in range(0, flat.numel(), step):
            h.update(codec.tensor_bytes(flat[start:start + step].cpu()))
    return h.hexdigest()


def split_state(state: Mapping[str, Any], frozen: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``state`` without the frozen parameters' entries, and the keys left out."""
    skip = set(frozen)
    kept = {k: v for k, v in state.items() if k not in skip}
    return kept, sorted(skip & state.keys())


def load_partial(module: nn.Module, state: Mapping[str, Any], omitted: Iterable[str], what: str) -> None:
    """Load a trainable-only ``state``: everything but ``omitted`` must be present, nothing extra."""
    result = module.load_state_dict(dict(state), strict=False)
    missing = sorted(set(result.missing_keys) - set(omitted))
    if missing or result.unexpected_keys:
        raise StateMismatch(f"{what}: trainable-only checkpoint does not fit the module (missing: {missing[:5]}, "
                            f"unexpected: {sorted(result.unexpected_keys)[:5]}); register the same architecture")


def check_base(module: nn.Module, frozen: list[str], recorded: str, what: str) -> None:
    """Refuse to restore a trainable-only checkpoint on top of a different frozen base."""
    got = fingerprint(module, frozen)
    if got != recorded:
        raise StateMismatch(
            f"{what}: base model fingerprint mismatch: the checkpoint was trained on a base with fingerprint "
            f"{recorded}, but the {len(frozen)} frozen parameter(s) loaded now have fingerprint {got}. Load the "
            "same base weights (same file, dtype and freezing) before session.restore(), or start a new run "
            "in an empty checkpoint.dir")


def is_module(obj: object) -> bool:
    return isinstance(obj, nn.Module)


__all__ = ["apply_frozen", "check_base", "fingerprint", "frozen_names", "is_module", "load_partial", "split_state"]
