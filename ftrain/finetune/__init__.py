"""Worker side: fine-tuning helpers: start a run from pretrained weights and train only part of the model.

* :func:`load_pretrained` copies weights from a ``.safetensors`` file, a
  ``.pt``/``.pth``/``.bin`` state dict (``weights_only=True``, never arbitrary
  pickle), an ftrain checkpoint, a DCP directory (read by torch.distributed.checkpoint,
  resharded into FSDP2 models), or a mapping into a model, in place; it renames
  keys (DDP/compile prefixes, ``key_map``, ``add_prefix``) and returns a
  :class:`LoadReport` of loaded, missing, unexpected, mismatched and cast keys.
* :func:`freeze` / :func:`unfreeze` / :func:`frozen_names` switch
  ``requires_grad`` by parameter-name pattern or submodule.
* :func:`param_groups` builds optimizer groups (per-pattern learning rates and
  options) with a ``"name"`` per group.

Typical use, before the Session restores (so a resumed fine-tune continues from
its own checkpoint, not from the pretrained weights)::

    report = load_pretrained(model, "base.safetensors", skip_mismatched=True)
    freeze(model, "backbone.*")
    opt = torch.optim.AdamW(param_groups(model, {"head.*": 1e-3}, include_frozen=True), lr=1e-5)

Nothing here touches the process group, except that loading a DCP directory under an
initialized one is a DCP collective: call it on every rank.
"""
from __future__ import annotations

from ftrain.finetune.freeze import freeze, frozen_names, param_groups, unfreeze
from ftrain.finetune.weights import LoadReport, load_pretrained

__all__ = [
    "LoadReport",
    "freeze",
    "frozen_names",
    "load_pretrained",
    "param_groups",
    "unfreeze",
]
