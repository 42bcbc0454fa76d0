"""Turn nested ``state_dict`` trees into JSON plus a flat table of tensors, and back.

Why not pickle: a checkpoint from a stranger must not run code when loaded. Every
value in a state tree is either a tensor (stored as raw bytes, indexed by name)
or a JSON value. The few Python types JSON lacks are written as small tagged
objects (key ``"$t"``):

* ``tuple``/``torch.Size``  -> ``{"$t": "tuple"|"size", "items": [...]}``
* a dict whose keys are not all strings (optimizer state is keyed by int), or
  that uses the reserved key ``"$t"`` -> ``{"$t": "dict", "items": [[k, v], ...]}``
* ``torch.dtype`` -> ``{"$t": "dtype", "name": "float32"}``
* a tensor -> ``{"$t": "tensor", "ref": "<name in the tensor table>"}``
* a NumPy array -> ``{"$t": "ndarray", "ref": ...}``; NumPy scalars become Python scalars.

Anything else is refused at save time with the path of the offending value, so a
save never "succeeds" with state that cannot be read back.

Pure functions; thread-safe.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftrain.errors import CheckpointError

TAG = "$t"

try:  # NumPy is optional; only needed if state trees contain NumPy values.
    import numpy as _np
except ImportError:  # pragma: no cover - exercised only without numpy
    _np = None  # type: ignore[assignment]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# A fixed table, not getattr(torch, name): a name from a file must never reach attribute lookup on a module.
DTYPES: dict[str, torch.dtype] = {
    dtype_name(d): d for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        *(getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
          if isinstance(getattr(torch, n, None), torch.dtype)),
    )
}


def dtype_from_name(name: str) -> torch.dtype:
    """The ``torch.dtype`` called ``name`` ("float32"); refuses anything else."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CheckpointError(f"unknown tensor dtype {name!r} in checkpoint") from None


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _add(self, path: str, tensor: torch.Tensor) -> str:
        name = path
        n = 1
        while name in self.tensors:  # keys 0 and "0" would otherwise collide
            n += 1
            name = f"{path}#{n}"
        self.tensors[name] = tensor
        return name

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            if obj.is_sparse or obj.is_quantized or obj.is_nested or obj.dtype not in DTYPES.values():
                raise CheckpointError(f"cannot store a {obj.layout} {obj.dtype} tensor at {path!r}: only dense tensors "
                                      f"of dtypes {sorted(DTYPES)}")
            return {TAG: "tensor", "ref": self._add(path, obj.detach())}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "name": dtype_name(obj)}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "items": list(obj)}
        if isinstance(obj, tuple):
            return {TAG: "tuple", "items": [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and TAG not in obj:
                return {k: self.encode(v, f"{path}/{k}") for k, v in obj.items()}
            return {TAG: "dict", "items": [[self.encode(k, f"{path}/<key>"), self.encode(v, f"{path}/{k}")]
                                            for k, v in obj.items()]}
        if _np is not None:
            if isinstance(obj, _np.ndarray):
                return {TAG: "ndarray", "ref": self._add(path, torch.from_numpy(_np.ascontiguousarray(obj)))}
            if isinstance(obj, _np.generic):
                return self.encode(obj.item(), path)  # .item() may give a non-JSON type (datetime): check it
        raise CheckpointError(
            f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at {path!r}: ftrain checkpoints hold "
            "only tensors and JSON values (no pickle); convert it in the object's state_dict()"
        )


def encode(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-serializable tree and ``{name: tensor}``.

    Tensor names are the path of the tensor in the tree under ``prefix``
    (e.g. ``model/fc.weight``), so they are stable and human-readable.
    """
    enc = _Encoder()
    return enc.encode(tree, prefix), enc.tensors


def decode(tree: Any, lookup: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; ``lookup(name)`` returns the stored tensor."""
    if isinstance(tree, list):
        return [decode(v, lookup) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tag = tree.get(TAG)
    if tag is None:
        return {k: decode(v, lookup) for k, v in tree.items()}
    if tag == "tensor":
        return lookup(tree["ref"])
    if tag == "ndarray":
        if _np is None:
            raise CheckpointError("checkpoint holds a NumPy array but NumPy is not installed")
        return lookup(tree["ref"]).numpy()
    if tag == "dtype":
        return dtype_from_name(tree["name"])
    if tag == "size":
        return torch.Size(tree["items"])
    if tag == "tuple":
        return tuple(decode(v, lookup) for v in tree["items"])
    if tag == "dict":
        return {_hashable(decode(k, lookup)): decode(v, lookup) for k, v in tree["items"]}
    raise CheckpointError(f"unknown tagged value {tag!r} in checkpoint state")


def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # a JSON round trip cannot produce one, but guard dict keys anyway
        return tuple(key)
    return key


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data

