"""Shared contract: a canonical SHA-256 of training state, to compare runs bit for bit.

Order (documented in docs/exactness.md): for each ``(name, state_dict)``
pair in the order given, the tree is encoded as for a checkpoint
(``checkpoint.codec``); then the hash takes, in sorted tensor-name order, each
tensor's name, dtype, shape and raw bytes, and finally the canonical JSON
(sorted keys) of the non-tensor structure. Tensors are hashed on the CPU.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ftrain.checkpoint import codec


def state_sha256(named_states: list[tuple[str, Any]]) -> str:
    h = hashlib.sha256()
    for name, state in named_states:
        tree, tensors = codec.encode(state, name)
        for tname in sorted(tensors):
            t = tensors[tname].cpu()
            h.update(f"{tname}|{codec.dtype_name(t.dtype)}|{list(t.shape)}|".encode())
            h.update(codec.tensor_bytes(t))
        h.update(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()
