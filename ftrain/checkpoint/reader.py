"""Read a committed checkpoint outside a training job: for export, inspection and fine-tuning.

A training job restores through :class:`ftrain.session.checkpointer.Checkpointer`
(every rank reads its share). Tools read a whole checkpoint in one process:
:func:`candidates` lists the checkpoints to try (a step, ``latest`` or ``best``,
ranked by a function the caller passes), :func:`read_trees` decodes the
replicated objects (model, optimizer, ...) and :func:`load` does both.
Every byte read is verified against the manifest's checksums; nothing is unpickled.

Thread-safe (no shared state); read-only on the directory.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint import codec, format
from ftrain.checkpoint.format import REPLICATED
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.remote import is_url
from ftrain.checkpoint.shard import chunk_key, read_shard_record, read_shard_tensors
from ftrain.checkpoint.store import CheckpointStore, open_store
from ftrain.errors import CheckpointError, CorruptCheckpoint

#: Orders a root's manifests best first (``ftrain.checkpoint.ranking.rank_manifests``); the storage layer
#: does not know what "best" means.
Ranking = Callable[[list[Manifest]], list[Manifest]]

log = logging.getLogger("ftrain.checkpoint")

SELECTORS = ("latest", "best")


def open_path(path: str | Path, which: int | str | None = None) -> tuple[CheckpointStore, int | str]:
    """The store and selector for ``path``: a checkpoint root, or one ``step-N`` directory inside it; a local path
    or a remote tier URL (``s3://bucket/run``, any fsspec URL)."""
    if is_url(str(path)):
        url = str(path).rstrip("/")
        head, _, last = url.rpartition("/")
        url_step = format.parse_step_dirname(last)
        try:
            store = open_store(head if url_step is not None else url)
        except OSError as e:
            raise CheckpointError(f"{url}: {e.strerror or e}") from None
        if url_step is not None:
            return store, url_step
        if not store.steps():
            raise CheckpointError(f"no checkpoints at {url} (or it cannot be listed)")
        return store, "latest" if which is None else which
    p = Path(path)
    step = format.parse_step_dirname(p.name)
    if step is not None and (p / format.MANIFEST).exists():
        if which not in (None, "latest", step, str(step)):
            raise CheckpointError(f"{p} is the checkpoint of step {step}, but step {which!r} was asked for; "
                                  "pass the checkpoint root to choose another step")
        return CheckpointStore(p.parent), step
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist or is not a directory")
    return CheckpointStore(p), "latest" if which is None else which


def parse_selector(text: str) -> int | str:
    """``latest``, ``best`` or a step number, from the command line."""
    if text in SELECTORS:
        return text
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"checkpoint step {text!r}: expected a step number, 'latest' or 'best'") from None
    if step < 0:
        raise CheckpointError(f"checkpoint step {text!r}: step numbers are >= 0")
    return step


def candidates(store: CheckpointStore, which: int | str, rank: Ranking | None = None) -> list[Manifest]:
    """Manifests to try for ``which``, in order: one for a step; newest first for ``latest``; for ``best``,
    the order ``rank`` gives the root's manifests."""
    if which == "latest":
        return list(store.candidates())
    if which == "best":
        if rank is None:
            raise CheckpointError("selecting the 'best' checkpoint needs a ranking of the manifests")
        try:
            return rank(store.manifests())
        except CheckpointError as e:  # the ranking does not know where the manifests came from
            raise CheckpointError(f"{store.root}: {e}") from None
    if not isinstance(which, int):
        raise CheckpointError(f"unknown checkpoint selector {which!r}: a step number, 'latest' or 'best'")
    if not store.path(which).is_dir():
        have = [s for s, _ in store.step_dirs()]
        raise CheckpointError(f"no checkpoint of step {which} in {store.root} (steps on disk: {have or 'none'})")
    return [store.read_manifest(which)]


def read_trees(store: CheckpointStore, manifest: Manifest, *, keep: str | None = None) -> dict[str, Any]:
    """Decode the replicated state of checkpoint ``manifest`` (verifying every file's checksum).

    ``keep`` (an object name) limits which tensors are materialised; all bytes
    are still checksummed. Returns ``{object name: state}``.
    """
    ckpt = format.step_dirname(manifest.step)
    ckpt_dir = store.path(manifest.step)
    record0 = read_shard_record(store.storage, ckpt, manifest, 0)
    for rank in range(1, manifest.world_size):  # verify every record, even though rank 0 holds the tree
        read_shard_record(store.storage, ckpt, manifest, rank)
    prefix = f"{REPLICATED}/{keep}/" if keep is not None else f"{REPLICATED}/"
    tensors: dict[str, torch.Tensor] = {}
    for rank in range(manifest.world_size):
        tensors.update(read_shard_tensors(store.storage, ckpt, manifest, rank, keep=lambda n: n.startswith(prefix)))
    tensors.update(assemble(manifest, tensors, prefix))
    tree = record0.trees.get(REPLICATED)
    if not isinstance(tree, dict):
        raise CorruptCheckpoint(str(ckpt_dir / format.shard_names(0)[0]), "replicated state tree missing")
    if keep is not None:
        if keep not in tree:  # meta lists it (check_object passed) but the tree lacks it: damage, so fall back
            raise CorruptCheckpoint(str(ckpt_dir / format.shard_names(0)[0]),
                                    f"object {keep!r} is listed in the manifest but missing from the state tree")
        tree = {keep: tree[keep]}
    try:
        return {name: codec.decode(sub, tensors.__getitem__) for name, sub in tree.items()}
    except (CheckpointError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(str(ckpt_dir), f"malformed state tree ({e})") from None


def assemble(manifest: Manifest, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors of the sharded tensors under ``prefix``, from their chunks in ``tensors`` (which it
    empties of them): a tool needs the whole tensor; a training job never builds one (``reading.py``)."""
    out: dict[str, torch.Tensor] = {}
    for name, entry in manifest.sharded.items():
        if not name.startswith(prefix):
            continue
        full = torch.empty(entry.shape, dtype=codec.dtype_from_name(entry.dtype))
        for i, c in enumerate(entry.chunks):
            part = tensors.pop(chunk_key(name, i))
            full[tuple(slice(o, o + z) for o, z in zip(c.offsets, c.sizes, strict=True))] = part
        out[name] = full  # the manifest check ensured the chunks tile the whole tensor
    return out


def load(store: CheckpointStore, which: int | str, *, name: str | None = None,
         rank: Ranking | None = None) -> tuple[Manifest, dict[str, Any]]:
    """The first checkpoint for ``which`` that reads back intact, and its replicated objects (or just ``name``).

    ``latest`` and ``best`` (ordered by ``rank``) fall back past damaged checkpoints with a warning; an
    explicit step raises :class:`CorruptCheckpoint` if it is damaged.
    """
    tried = candidates(store, which, rank)
    if not tried:
        raise CheckpointError(f"no valid checkpoint in {store.root} (see `ftrain ckpt ls {store.root}`)")
    last_error: CorruptCheckpoint | None = None
    for manifest in tried:
        try:
            store.require_whole(manifest)
            if name is not None:
                check_object(manifest, name, store)
            return manifest, read_trees(store, manifest, keep=name)
        except CorruptCheckpoint as e:
            if isinstance(which, int):
                raise
            log.warning("skipping checkpoint step %d: %s: %s", manifest.step, e.path, e.reason)
            last_error = e
    raise CheckpointError(f"no {which} checkpoint in {store.root} reads back intact; the last tried failed with "
                          f"{last_error}")


def check_object(manifest: Manifest, name: str, store: CheckpointStore) -> None:
    """Raise a clear error if ``name`` is not a replicated object of this checkpoint."""
    replicated = manifest.meta.get("replicated") or []
    if name not in replicated:
        per_rank = manifest.meta.get("per_rank") or []
        extra = f" ({name!r} is per-rank state)" if name in per_rank else ""
        raise CheckpointError(f"checkpoint step {manifest.step} in {store.root} has no object {name!r}{extra}; "
                              f"it holds {sorted(replicated)}: pick one of those")
