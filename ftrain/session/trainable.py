"""Worker side: which parameters of a module train, and trainable-only state: what a fine-tune checkpoint needs.

``requires_grad`` is not part of ``state_dict()``, so without help a resumed run
freezes whatever its script freezes at start: a run that unfroze its backbone at
step 1000 (gradual unfreezing) and restarts at step 1500 would silently train
with a frozen backbone. The session records the frozen parameter names in every
checkpoint and re-applies them on restore.

With ``checkpoint.trainable_only`` a module's frozen parameters that still hold
the base's values are left out of the checkpoint (a LoRA run does not copy its
multi-GB base on every save). They are referenced by a fingerprint: XXH3-128
over each omitted parameter's name, dtype, shape and the XXH3-128 of its bytes,
in name order. On resume the script loads the base from its original source,
and the fingerprint must match before the trainable part is restored on top.

Functions only; thread-safe as long as the module is not being modified.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

import torch
from torch import nn

from ftrain.checkpoint import checksum, codec
from ftrain.errors import StateMismatch

log = logging.getLogger("ftrain")

_HASH_CHUNK = 64 << 20  # GPU tensors are hashed through bounded host copies


def frozen_names(module: nn.Module) -> list[str]:
    """Sorted names of the parameters with ``requires_grad`` false (every name of a shared parameter)."""
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad)


def check_frozen_names(module: nn.Module, frozen: Iterable[str], what: str) -> None:
    """A frozen name the module does not have means the checkpoint is for another architecture."""
    params = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(set(frozen) - params.keys())
    if unknown:
        raise StateMismatch(f"{what}: the checkpoint freezes parameter(s) the module does not have: {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}; is this the same architecture?")


def set_requires_grad(module: nn.Module, flags: Mapping[str, bool]) -> None:
    """Put back ``requires_grad`` as recorded in ``flags`` (name -> flag), e.g. to undo a failed restore."""
    for name, p in module.named_parameters(remove_duplicate=False):
        if name in flags and p.requires_grad != flags[name]:
            p.requires_grad_(flags[name])


def apply_frozen(module: nn.Module, frozen: Iterable[str], what: str) -> list[str]:
    """Set ``requires_grad`` so that exactly ``frozen`` are frozen; return the names that changed.

    ``what`` names the module in errors. A name the module does not have means
    the checkpoint is for another architecture: :class:`StateMismatch`.
    """
    want = set(frozen)
    check_frozen_names(module, want, what)
    params = dict(module.named_parameters(remove_duplicate=False))
    changed = []
    for name, p in params.items():
        trainable = name not in want
        if p.requires_grad != trainable:
            p.requires_grad_(trainable)
            changed.append(name)
    return changed


def param_digest(t: torch.Tensor) -> str:
    """XXH3-128 of a tensor's raw bytes (GPU tensors through bounded host copies)."""
    h = checksum.Hasher()
    flat = t.detach().reshape(-1)
    if flat.device.type == "cpu":
        h.update(codec.tensor_bytes(flat))
        return h.hexdigest()
    step = max(1, _HASH_CHUNK // max(1, t.element_size()))
    for start in range(0, flat.numel(), step):
        h.update(codec.tensor_bytes(flat[start:start + step].cpu()))
    return h.hexdigest()


def combine(module: nn.Module, digests: Mapping[str, str]) -> str:
    """The fingerprint of the named parameters from their digests: XXH3-128 over sorted name|dtype|shape|digest."""
    params = dict(module.named_parameters(remove_duplicate=False))
    h = checksum.Hasher()
    for name in sorted(digests):
        t = params[name]
        h.update(f"{name}|{codec.dtype_name(t.dtype)}|{list(t.shape)}|{digests[name]}\n".encode())
    return h.hexdigest()


def digests(module: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: digest}`` of the named parameters' current values."""
    params = dict(module.named_parameters(remove_duplicate=False))
    return {n: param_digest(params[n]) for n in set(names)}


def _identity(t: torch.Tensor) -> tuple[int, int, torch.dtype, torch.device]:
    """What says "the same bytes as when hashed" besides the version counter: ``module.to(...)`` or
    ``load_state_dict(assign=True)`` swap a parameter's storage without bumping its version."""
    return t._version, t.data_ptr(), t.dtype, t.device


class FrozenBase:
    """The frozen parameters that still hold the base's values: the only ones a trainable-only save may omit.

    The base is what the script loaded from its source: the frozen parameters
    when the run started, or, on a resumed run, those the checkpoint omitted
    (their fingerprint was checked). A parameter frozen later, or changed since
    (unfrozen, trained and frozen again), is saved in full: its values exist
    nowhere else. Changes are noticed through the tensor's version counter,
    which every in-place write bumps (optimizer steps, ``no_grad`` updates) but
    writes through ``.data`` do not (documented); a bumped parameter is re-hashed.
    Re-hashing the whole base on every save would cost about 100 ms per GB of the
    training thread's time instead.
    """

    def __init__(self) -> None:
        self._digests: dict[str, tuple[tuple[Any, ...], str]] = {}  # name -> (tensor identity when hashed, digest)

    def adopt(self, module: nn.Module, digests: Mapping[str, str] | None = None, names: Iterable[str] = ()) -> None:
        """Make parameters part of the base: with known ``digests`` (just verified), or hashed now (``names``)."""
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, digest in (digests or {}).items():
            self._digests[name] = (_identity(params[name]), digest)
        for name in names:
            self._digests[name] = (_identity(params[name]), param_digest(params[name]))

    def adopt_if_unchanged(self, module: nn.Module, before: Mapping[str, str]) -> None:
        """Adopt the parameters whose values still have the digests ``before`` (taken before a load)."""
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, digest in before.items():
            if param_digest(params[name]) == digest:
                self._digests[name] = (_identity(params[name]), digest)

    def unchanged(self, module: nn.Module, frozen: Iterable[str]) -> dict[str, str]:
        """``{name: digest}`` of the ``frozen`` parameters that still hold their base values."""
        params = dict(module.named_parameters(remove_duplicate=False))
        out = {}
        for name in frozen:
            known = self._digests.get(name)
            if known is None:
                continue
            identity, digest = known
            if _identity(params[name]) != identity:
                now = param_digest(params[name])
                if now != digest:  # trained since it was part of the base: from now on it is saved in full
                    del self._digests[name]
                    continue
                self._digests[name] = (_identity(params[name]), now)
            out[name] = digest
        return out


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


def check_base(module: nn.Module, omitted: list[str], recorded: str, what: str) -> dict[str, str]:
    """Refuse to restore a trainable-only checkpoint on top of different base weights; return their digests."""
    params = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(set(omitted) - params.keys())
    if unknown:
        raise StateMismatch(f"{what}: the checkpoint leaves out parameter(s) the module does not have: {unknown[:5]}; "
                            "is this the same architecture?")
    digests = {n: param_digest(params[n]) for n in set(omitted)}
    got = combine(module, digests)
    if got != recorded:
        raise StateMismatch(
            f"{what}: base model fingerprint mismatch: the checkpoint was trained on a base with fingerprint "
            f"{recorded}, but the {len(digests)} base parameter(s) it leaves out have fingerprint {got} now. Load "
            "the same base weights (same file, dtype and freezing) before session.restore(), or start a new run in "
            "an empty checkpoint.dir. (After load_best(): those parameters were trained since that checkpoint, e.g. "
            "by gradual unfreezing; reload the base weights first.)")
    return digests


def is_module(obj: object) -> TypeGuard[nn.Module]:
    return isinstance(obj, nn.Module)


__all__ = ["FrozenBase", "apply_frozen", "check_base", "check_frozen_names", "combine", "digests", "frozen_names",
           "is_module", "load_partial", "param_digest", "set_requires_grad", "split_state"]
