"""Storage leaf: the checks of a checkpoint's state trees that need no registered object.

Restore (``session/restorer.py``) runs them on the trees it reads before it
compares them with the objects registered now (``session/validation.py``: key
sets, shapes, dtypes, which only those objects know), and
:meth:`CheckpointStore.validate` runs them on every tree for ``ftrain ckpt
verify`` and ``ls``: one definition, so a checkpoint restore refuses for its own
content is one verify calls CORRUPT (docs/FORMAT.md, "Restore", step 6). The
manifest's ``meta`` is checked where it is parsed (``manifest.check_meta``).

What a tree must be, tensors still :class:`TensorSpec` descriptions (nothing
allocated): present in its shard record and an object; every object ``meta``
names in it, with an object as its state (what any ``state_dict()`` returns);
in every per-rank tree an RNG state of the structure ``rng.capture()`` writes.
Everything here raises :class:`CorruptCheckpoint` (damage). Pure, apart from
:func:`read_trees`. Imports torch only when called: the store imports this, and
the supervisor side imports the store (``tests/unit/test_light_imports.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftrain.checkpoint import format
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import ShardRecord, read_shard_record
from ftrain.checkpoint.storage import Storage
from ftrain.errors import CheckpointError, CorruptCheckpoint

if TYPE_CHECKING:
    import torch

#: The layout of the ``rng`` state in every per-rank tree (``session/rng.py`` writes it; docs/FORMAT.md). Another
#: version is not damage: restore refuses it as a mismatch, verify cannot judge it.
RNG_VERSION = 1
_MT19937_WORDS = 625  # Python's random.getstate(): 624 words of state and the position


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the manifest describes it, before its bytes are read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def numpy(self) -> TensorSpec:  # a NumPy array is stored as a tensor: its description stands for it too
        return self

    def describe(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).removeprefix('torch.')}"


def specs_of(manifest: Manifest) -> dict[str, TensorSpec]:
    """Every tensor of the manifest as a description (a sharded one by its global shape), for the checks that
    run before any byte is read."""
    from ftrain.checkpoint import codec

    out = {n: TensorSpec(t.shape, codec.dtype_from_name(t.dtype)) for n, t in manifest.tensors.items()}
    out.update((n, TensorSpec(e.shape, codec.dtype_from_name(e.dtype))) for n, e in manifest.sharded.items())
    return out


def read_trees(storage: Storage, manifest: Manifest, ranks: Iterable[int], *, replicated: bool = True
               ) -> dict[str, Any]:
    """The encoded state trees from the verified shard records of checkpoint ``manifest`` in ``storage``: the
    replicated tree (shard 0's record, with ``replicated``) and the per-rank tree of each of ``ranks``. A tree its
    record lacks is damage of that record (the error names the file: another copy of it may do)."""
    ckpt = format.step_dirname(manifest.step)
    records: dict[int, ShardRecord] = {}
    trees: dict[str, Any] = {}
    for key, owner in ([(REPLICATED, 0)] if replicated else []) + [(rank_key(r), r) for r in ranks]:
        if owner not in records:
            records[owner] = read_shard_record(storage, ckpt, manifest, owner)
        tree = records[owner].trees.get(key)
        if tree is None:
            raise CorruptCheckpoint(storage.describe(f"{ckpt}/{format.shard_names(owner)[0]}"),
                                    f"state tree {key!r} missing")
        trees[key] = tree
    return trees


def decode_trees(trees: dict[str, Any], lookup: Callable[[str], Any], where: str) -> dict[str, Any]:
    """Each tree decoded (``lookup``: a tensor's name to what stands for it); a malformed one is damage."""
    from ftrain.checkpoint import codec

    try:
        # Per object, as encoded: an alias decodes to the very tensor (or TensorSpec) it names.
        return {key: codec.decode_objects(tree, lookup) for key, tree in trees.items()}
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CorruptCheckpoint(where, f"malformed state tree ({type(e).__name__}: {e})") from None


def check_trees(manifest: Manifest, trees: dict[str, Any], where: str) -> None:
    """The decoded trees (any subset: the replicated one, per-rank ones) hold what ``manifest`` says they do."""
    replicated, per_rank = manifest.object_names()
    for key, tree in trees.items():
        mine = key != REPLICATED
        if not isinstance(tree, dict):
            kind = "per-rank" if mine else "replicated"
            raise CorruptCheckpoint(where, f"the {kind} state tree is a {type(tree).__name__}, not an object")
        for name in per_rank if mine else replicated:
            if name not in tree:
                raise CorruptCheckpoint(where, f"the manifest lists {name!r} but its state tree is missing")
            if not isinstance(tree[name], dict):
                raise CorruptCheckpoint(where, f"the state of {name!r} is a {type(tree[name]).__name__}, not an "
                                               "object")
        if mine:
            check_rng(tree.get("rng"), where)


def check_rng(state: Any, where: str) -> None:
    """The RNG state ``rng.capture()`` writes; anything else is damage. A version other than
    :data:`RNG_VERSION` is left to the caller (restore: a mismatch)."""
    import torch

    def bad(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(where, f"RNG state: {what}")

    if not isinstance(state, dict):
        raise bad("missing or not an object")
    if not _is_int(state.get("version")):
        raise bad(f"version {state.get('version')!r} is not a number")
    if state["version"] != RNG_VERSION:
        return
    py = state.get("python")
    if not (isinstance(py, tuple) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], (tuple, list))
            and len(py[1]) == _MT19937_WORDS and all(_is_int(w) and 0 <= w < 1 << 32 for w in py[1])
            and (py[2] is None or isinstance(py[2], float))):
        raise bad("Python 'random' state is malformed")
    if not _byte_tensor(state.get("torch"), len(torch.get_rng_state())):
        raise bad("torch generator state is not a uint8 tensor of the generator's size")
    if "numpy" in state:
        n = state["numpy"]
        if not (isinstance(n, dict) and n.get("kind") == "MT19937" and isinstance(n.get("keys"), list)
                and len(n["keys"]) == _MT19937_WORDS - 1
                and all(_is_int(w) and 0 <= w < 1 << 32 for w in n["keys"])
                and _is_int(n.get("pos")) and 0 <= n["pos"] <= _MT19937_WORDS - 1 and n.get("has_gauss") in (0, 1)
                and isinstance(n.get("cached_gaussian"), (int, float))):
            raise bad("NumPy state is malformed")
    if "cuda" in state:
        cuda = state["cuda"]
        if not (isinstance(cuda, list) and all(_byte_tensor(t) for t in cuda)):
            raise bad("CUDA generator states are not 1-D uint8 tensors")


def check_checkpoint(storage: Storage, manifest: Manifest, present: set[str]) -> None:
    """Every tree of checkpoint ``manifest`` whose shard record is in ``present`` (files already verified): read,
    decoded and checked as restore does before it looks at any registered object."""
    ckpt = format.step_dirname(manifest.step)
    ranks = [r for r in range(manifest.world_size) if format.shard_names(r)[0] in present]
    trees = read_trees(storage, manifest, ranks, replicated=format.shard_names(0)[0] in present)
    where = storage.describe(ckpt)
    check_trees(manifest, decode_trees(trees, specs_of(manifest).__getitem__, where), where)


def _byte_tensor(t: Any, size: int | None = None) -> bool:
    import torch

    return (isinstance(t, TensorSpec) and t.dtype == torch.uint8 and len(t.shape) == 1
            and (size is None or t.shape[0] == size))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
