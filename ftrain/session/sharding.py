"""Worker side: sharded models (FSDP2 ``fully_shard``, any DTensor layout) and their optimizers, as registered objects.

A module is *sharded* when any of its parameters is a DTensor; an optimizer is
sharded when it steps such parameters, and it must be registered together with
the module that owns them (its state is keyed by that module's parameter
names). Their state goes through torch's own FSDP-aware state dicts
(``torch.distributed.checkpoint.state_dict``): ``get_model_state_dict`` /
``get_optimizer_state_dict`` give DTensors whose local shards the checkpoint
stores as chunks, and ``set_state_dict`` loads them back at any world size or
mesh; ftrain adds no FSDP logic of its own.

Not thread-safe: used by the training thread of one session.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from ftrain.checkpoint import dtensors
from ftrain.errors import FtrainError


def is_sharded_module(obj: object) -> bool:
    return isinstance(obj, nn.Module) and any(dtensors.is_dtensor(p) for p in obj.parameters())


def is_sharded_optimizer(obj: object) -> bool:
    return isinstance(obj, torch.optim.Optimizer) and any(
        dtensors.is_dtensor(p) for g in obj.param_groups for p in g["params"])


def owners(objects: Mapping[str, tuple[object, bool]], also: Collection[str] = ()) -> dict[str, str]:
    """Each sharded optimizer's key (and each key in ``also``: optimizers whose checkpoint is keyed by parameter
    name, saved sharded) -> the key of the registered module that owns its parameters.

    Raises FtrainError naming the optimizer when no single registered module holds all of them: its state could
    not be named by parameter, nor resharded.
    """
    modules = {k: {id(p) for p in o.parameters()} for k, (o, _) in objects.items() if isinstance(o, nn.Module)}
    out: dict[str, str] = {}
    for key, (obj, _) in objects.items():
        if not (is_sharded_optimizer(obj) or (key in also and isinstance(obj, torch.optim.Optimizer))):
            continue
        assert isinstance(obj, torch.optim.Optimizer)
        params = {id(p) for g in obj.param_groups for p in g["params"]}
        owner = [m for m, ids in modules.items() if params <= ids]
        if not owner:
            raise FtrainError(f"optimizer {key!r} steps sharded (DTensor) parameters, but no registered module holds "
                              "all of them; register the FSDP model together with it: "
                              "session.register(model=model, optimizer=optimizer)")
        out[key] = owner[0]
    return out


def named_in(tree: Any) -> list[str]:
    """The objects of a decoded replicated tree whose state is an optimizer's keyed by parameter name (what
    :func:`optimizer_state` saves): they load through ``set_optimizer_state_dict`` whether sharded now or not."""
    if not isinstance(tree, dict):
        return []
    out = []
    for key, state in tree.items():
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if isinstance(groups, list) and any(isinstance(g, dict) and isinstance(g.get("params"), list)
                                            and any(isinstance(n, str) for n in g["params"]) for g in groups):
            out.append(key)
    return out


def model_state(model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (DTensors for sharded state).

    torch's ``get_optimizer_state_dict`` first creates the state of an optimizer that has none (by stepping it
    with zero gradients and a zero learning rate, which counts a step): a save before the first step must not
    change training, so that case is spelled out here instead (no state, the groups by parameter name).
    """
    if opt.state:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": {}, "param_groups": groups}


def load(model: nn.Module, opt: torch.optim.Optimizer | None, model_sd: dict[str, Any] | None,
         opt_sd: dict[str, Any] | None) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if model_sd is not None:
        set_model_state_dict(model, model_sd)
    if opt is not None and opt_sd is not None:
        set_optimizer_state_dict(model, opt, opt_sd)


def templates(model: nn.Module, prefix: str) -> dict[str, Any]:
    """For an optimizer's sharded state: the parameter DTensor each state tensor is laid out like, by the name
    the codec gives it (``replicated/<optimizer>/state/<parameter>/<entry>`` -> the parameter)."""
    return {f"{prefix}/state/{n}": p for n, p in model.named_parameters(remove_duplicate=False)
            if dtensors.is_dtensor(p)}
