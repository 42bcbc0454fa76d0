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
* a DTensor (a shard of a global tensor: FSDP2) -> ``{"$t": "dtensor", "ref": ...}``; the table holds the
  DTensor, and the checkpoint stores its local shard as a chunk (``dtensors.py``, docs/FORMAT.md)
* a tensor that is the very same view of the same storage as one encoded before
  in the same scope (tied weights: ``lm_head.weight`` is ``wte.weight``) ->
  ``{"$t": "alias", "ref": "<the first one's name>"}``: its bytes are stored once,
  and decoding gives both places the same tensor object (see :func:`encode`)
* a NumPy array -> ``{"$t": "ndarray", "ref": ...}``; NumPy scalars become Python scalars.

Anything else is refused at save time with the path of the offending value, so a
save never "succeeds" with state that cannot be read back.

Pure functions; thread-safe.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftrain.checkpoint import dtensors
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


#: What makes two tensors one: the same storage, offset, shape, strides, dtype and device.
_ViewKey = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


def _view_key(t: torch.Tensor) -> _ViewKey | None:
    """The identity of ``t`` as a view of its storage; None for a tensor that is never an alias.

    Empty tensors are never aliases: they may all report storage pointer 0 without sharing anything,
    and storing them twice costs nothing. A tensor without a real storage (a wrapper subclass) is
    stored on its own as well.
    """
    if t.numel() == 0:
        return None
    if dtensors.is_dtensor(t):  # the same view of the same local shard: one DTensor under two names (tied)
        t = dtensors.local(t)
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0:
        return None
    return (ptr, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        #: Tensors encoded so far in the current alias scope, by view identity -> their table name.
        self.seen: dict[_ViewKey, str] = {}

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
            key = _view_key(obj)
            if key is not None and key in self.seen:
                # Exactly the same view (not merely overlapping memory: a slice of a weight is a separate
                # tensor): store the bytes once, and say where they are.
                return {TAG: "alias", "ref": self.seen[key]}
            name = self._add(path, obj if dtensors.is_dtensor(obj) else obj.detach())  # a DTensor: its shard is read
            if key is not None:
                self.seen[key] = name
            # A DTensor's table entry is the DTensor itself: the snapshot stores its local shard as a chunk.
            return {TAG: "dtensor" if dtensors.is_dtensor(obj) else "tensor", "ref": name}
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
    (e.g. ``model/fc.weight``), so they are stable and human-readable. The
    whole of ``tree`` is one alias scope: a tensor that is the same view of the
    same storage as one met earlier in it is written as an ``alias`` of that one
    and is not added to the table (partial overlaps are separate tensors).
    """
    enc = _Encoder()
    return enc.encode(tree, prefix), enc.tensors


def encode_objects(objects: dict[str, Any], prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """:func:`encode` of a checkpoint tree ``{object name: state}``, one alias scope per object.

    Per object, not per tree, because objects are read back one by one
    (``ftrain ckpt export`` materialises only the model's tensors): an alias
    must never point into another object's state. A dict that is not a plain
    JSON object (a key that is not a string, or is ``$t``) is encoded whole.
    """
    if not (isinstance(objects, dict) and all(isinstance(k, str) for k in objects) and TAG not in objects):
        return encode(objects, prefix)
    enc = _Encoder()
    out: dict[str, Any] = {}
    for name, state in objects.items():
        enc.seen = {}  # a new scope; the name table stays shared, so names stay unique
        out[name] = enc.encode(state, f"{prefix}/{name}")
    return out, enc.tensors


class _Decoder:
    """One decoding scope: every reference to a name gives one object, and aliases must name a tensor of it."""

    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self.lookup = lookup
        self.cache: dict[str, Any] = {}
        self.tensor_refs: set[str] = set()
        self.alias_refs: set[str] = set()

    def get(self, ref: Any) -> Any:
        if not isinstance(ref, str):
            raise CheckpointError(f"tensor reference {ref!r} is not a name")
        if ref not in self.cache:
            self.cache[ref] = self.lookup(ref)
        return self.cache[ref]

    def decode(self, tree: Any) -> Any:
        if isinstance(tree, list):
            return [self.decode(v) for v in tree]
        if not isinstance(tree, dict):
            return tree
        tag = tree.get(TAG)
        if tag is None:
            return {k: self.decode(v) for k, v in tree.items()}
        if tag in ("tensor", "dtensor"):
            value = self.get(tree["ref"])  # first: it checks that the name is a string
            self.tensor_refs.add(tree["ref"])
            return value
        if tag == "alias":
            # The same object as the tensor it names, so a decoded state dict keeps the tie.
            value = self.get(tree["ref"])
            self.alias_refs.add(tree["ref"])
            return value
        if tag == "ndarray":
            if _np is None:
                raise CheckpointError("checkpoint holds a NumPy array but NumPy is not installed")
            return self.get(tree["ref"]).numpy()
        if tag == "dtype":
            return dtype_from_name(tree["name"])
        if tag == "size":
            return torch.Size(tree["items"])
        if tag == "tuple":
            return tuple(self.decode(v) for v in tree["items"])
        if tag == "dict":
            return {_hashable(self.decode(k)): self.decode(v) for k, v in tree["items"]}
        raise CheckpointError(f"unknown tagged value {tag!r} in checkpoint state")

    def finish(self, result: Any) -> Any:
        stray = sorted(self.alias_refs - self.tensor_refs, key=str)
        if stray:  # an encoder never writes these; a reader of one object must not need another's tensors
            raise CheckpointError(f"alias of {stray[0]!r}, which no tensor of the same state stores")
        return result


def decode(tree: Any, lookup: Callable[[str], Any]) -> Any:
    """Inverse of :func:`encode`; ``lookup(name)`` returns the stored tensor (or a placeholder for it).

    ``lookup`` is called once per name: an alias and the tensor it names decode
    to the same object. An alias must name a tensor stored in ``tree`` itself.
    """
    dec = _Decoder(lookup)
    return dec.finish(dec.decode(tree))


def decode_objects(tree: Any, lookup: Callable[[str], Any]) -> Any:
    """Inverse of :func:`encode_objects`: each object's state decoded on its own (its own alias scope)."""
    if isinstance(tree, dict) and TAG not in tree:
        return {k: decode(v, lookup) for k, v in tree.items()}
    return decode(tree, lookup)


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

