"""Worker side: does a checkpoint's state fit the objects registered now? Checked before anything is loaded.

Restore is a transaction (docs/FORMAT.md, "Restore"): every tree is checked
here against the registered objects while its tensors are still only
*descriptions* (:class:`TensorSpec`: shape and dtype from the manifest), so a
checkpoint that does not fit is refused before a byte of tensor data is read or
allocated, and before any object is touched. Two verdicts:

* **damage** (:class:`CorruptCheckpoint`): state that is ill-typed for what it
  claims to be (a tensor where a number belongs, a missing object, a malformed
  RNG state). Restore falls back to the next older checkpoint.
* **mismatch** (:class:`StateMismatch`): well-formed state for another model (a
  different key set, a different shape or dtype). Restore stops with the key,
  both shapes and the fix: an older checkpoint of the same run would not fit
  either.

What needs no registered object (the trees' shape, the RNG state's structure, ``meta``) is checked before
these run, by the storage leaf that ``ftrain ckpt verify`` uses too (``checkpoint/content.py``,
``manifest.check_meta``): here only what the objects registered now decide. Pure functions over the trees and
the live objects (read, never modified).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ftrain.checkpoint import content
from ftrain.checkpoint.content import TensorSpec
from ftrain.errors import CorruptCheckpoint, StateMismatch
from ftrain.session import rng
from ftrain.stateful import Stateful

__all__ = ["PARAM_SHAPED", "TensorSpec", "check_module", "check_objects", "check_optimizer", "check_rng",
           "check_sharded_optimizer"]

#: Optimizer state entries that are known to have the parameter's shape (torch.optim's optimizers).
PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                          "acc_delta", "sum", "ax", "prev", "exp_inf"})


def check_objects(objects: Mapping[str, tuple[Stateful, bool]], replicated: Any, mine: Any,
                  omitted: Mapping[str, Sequence[str]], where: str,
                  sharded: Mapping[str, nn.Module] | None = None) -> None:
    """Check every registered object's saved state (and this rank's RNG state) against the object now.

    ``replicated`` and ``mine`` are the decoded trees with :class:`TensorSpec`
    leaves, which passed ``content.check_trees`` (objects, each registered object's state an object, the RNG
    state's structure); ``omitted`` the state keys a trainable-only checkpoint left out; ``where`` names the
    checkpoint in messages; ``sharded`` maps each sharded optimizer to its module (their state is keyed by
    parameter name: ``sharding.py``).
    """
    for key, (obj, per_rank) in objects.items():
        state = (mine if per_rank else replicated)[key]
        if isinstance(obj, nn.Module):
            check_module(key, obj, state, omitted.get(key, ()), where)
        elif sharded and key in sharded:
            check_sharded_optimizer(key, sharded[key], state, where)
        elif isinstance(obj, torch.optim.Optimizer):
            check_optimizer(key, obj, state, where)
    check_rng(mine.get("rng"), where)


def check_module(key: str, module: nn.Module, state: Any, omitted: Sequence[str], where: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CorruptCheckpoint(where, f"the state of module {key!r} is not a mapping of names")
    current = module.state_dict()
    expected = set(current) - set(omitted)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise StateMismatch(f"checkpoint {where} does not fit module {key!r}: keys missing from the checkpoint "
                            f"{_few(missing)}, keys the module does not have {_few(unexpected)}; register the same "
                            "architecture the checkpoint was saved from (or start in an empty checkpoint.dir)")
    for name in sorted(state):
        now, saved = current[name], state[name]
        if not isinstance(now, torch.Tensor):
            continue  # extra state (get_extra_state): the module's own business
        if not isinstance(saved, TensorSpec):
            raise CorruptCheckpoint(where, f"{key}.{name} is a {type(saved).__name__} in the checkpoint, not a tensor")
        if saved.shape != tuple(now.shape) or saved.dtype != now.dtype:
            raise StateMismatch(
                f"checkpoint {where} does not fit module {key!r}: {name} is {saved.describe()} in the checkpoint "
                f"but {TensorSpec(tuple(now.shape), now.dtype).describe()} in the registered model; build the "
                "model with the configuration the checkpoint was saved with (or start in an empty checkpoint.dir)")


def check_optimizer(key: str, opt: torch.optim.Optimizer, state: Any, where: str) -> None:
    _check_optimizer_tree(key, state, where)
    groups = state["param_groups"]
    for group in groups:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in group["params"])):
            raise CorruptCheckpoint(where, f"optimizer {key!r}: a parameter group is malformed")
    sizes, now = [len(g["params"]) for g in groups], [len(g["params"]) for g in opt.param_groups]
    if sizes != now:
        raise StateMismatch(f"checkpoint {where} does not fit optimizer {key!r}: parameter groups of sizes {sizes} "
                            f"in the checkpoint, {now} now; build the optimizer over the same parameters")
    params = {i: p for g_saved, g_now in zip(groups, opt.param_groups, strict=True)
              for i, p in zip(g_saved["params"], g_now["params"], strict=True)}
    _check_param_state(key, state["state"], params, where)


def _check_optimizer_tree(key: str, state: Any, where: str) -> None:
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        raise CorruptCheckpoint(where, f"the state of optimizer {key!r} lacks its 'state' and 'param_groups'")


def _check_param_state(key: str, saved: dict[Any, Any], params: Mapping[Any, torch.Tensor], where: str) -> None:
    """Each saved per-parameter entry names a parameter, and its parameter-shaped tensors have that shape
    (``params``: by number for ``optimizer.state_dict()``, by name for ``get_optimizer_state_dict``)."""
    for pid, entry in saved.items():
        if pid not in params or not isinstance(entry, dict):
            raise CorruptCheckpoint(where, f"optimizer {key!r}: state for unknown parameter {pid!r}")
        shape = tuple(params[pid].shape)
        for name in PARAM_SHAPED & set(entry):
            value = entry[name]
            if not isinstance(value, TensorSpec):
                raise CorruptCheckpoint(where, f"optimizer {key!r}: state[{pid}].{name} is not a tensor")
            if value.shape != shape:
                raise StateMismatch(f"checkpoint {where} does not fit optimizer {key!r}: state[{pid}].{name} has "
                                    f"shape {list(value.shape)}, its parameter {list(shape)}")


def check_sharded_optimizer(key: str, model: nn.Module, state: Any, where: str) -> None:
    """An optimizer's state as ``get_optimizer_state_dict`` gives it: keyed by the parameters' names."""
    _check_optimizer_tree(key, state, where)
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in state["param_groups"]:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)):
            raise CorruptCheckpoint(where, f"optimizer {key!r}: a parameter group is malformed")
        if not all(isinstance(n, str) for n in group["params"]):
            raise StateMismatch(f"checkpoint {where}: optimizer {key!r} was saved unsharded (its state is keyed by "
                                "parameter number) and is sharded now; resume it unsharded, or start the optimizer "
                                "afresh from the model weights (ftrain.finetune.load_pretrained)")
        unknown = sorted(set(group["params"]) - set(params))
        if unknown:
            raise StateMismatch(f"checkpoint {where} does not fit optimizer {key!r}: it steps parameters the model "
                                f"does not have {_few(unknown)}; build the optimizer over the same model")
    _check_param_state(key, state["state"], params, where)


def check_rng(state: Any, where: str) -> None:
    """The RNG state :func:`ftrain.session.rng.capture` writes: its structure (``content.check_rng``: damage),
    then what this process decides (another version, another CUDA device count: a mismatch)."""
    content.check_rng(state, where)
    if state["version"] != rng.VERSION:
        raise StateMismatch(f"checkpoint {where}: its RNG state has version {state['version']}, this ftrain reads "
                            f"{rng.VERSION}; resume it with the ftrain version that wrote it")
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) != torch.cuda.device_count():
        raise StateMismatch(f"checkpoint {where}: CUDA RNG state saved for {len(cuda)} device(s), this process "
                            f"sees {torch.cuda.device_count()}; set CUDA_VISIBLE_DEVICES as in the original run")


def _few(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}" if names else "none"
