"""Read a committed checkpoint outside a training job: for export, inspection and fine-tuning.

A training job restores through :class:`~ftrain.checkpoint.checkpointer.Checkpointer`
(every rank reads its share). Tools read a whole checkpoint in one process:
:func:`select` picks the checkpoint (a step, ``latest`` or ``best``),
:func:`read_objects` decodes the replicated objects (model, optimizer, ...).
Every byte read is verified against the manifest's checksums; nothing is unpickled.

Thread-safe (no shared state); read-only on the directory.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint import codec, layout
from ftrain.checkpoint.checkpointer import REPLICATED
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.shard import read_shard_record, read_shard_tensors
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CheckpointError, CorruptCheckpoint
from ftrain.selection import metric_value, rank_steps

log = logging.getLogger("ftrain.checkpoint")

SELECTORS = ("latest", "best")


def open_path(path: str | Path, which: int | str | None = None) -> tuple[CheckpointStore, int | str]:
    """The store and selector for ``path``: a checkpoint root, or one ``step-N`` directory inside it."""
    p = Path(path)
    step = layout.parse_step_dirname(p.name)
    if step is not None and (p / layout.MANIFEST).exists():
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


def best_ranking(store: CheckpointStore) -> tuple[str, str, list[Manifest]]:
    """``(monitor, mode, manifests best first)`` by the metric the newest checkpoint monitors.

    Only checkpoints whose manifest records that metric for their own step are
    ranked. Raises :class:`CheckpointError` if no checkpoint monitors a metric.
    """
    manifests = []
    for step, _ in store.step_dirs():
        try:
            manifests.append(store.read_manifest(step))
        except CorruptCheckpoint as e:
            log.warning("skipping checkpoint step %d: %s: %s", step, e.path, e.reason)
    monitor = next((m.meta["monitor"] for m in reversed(manifests) if _valid_monitor(m.meta.get("monitor"))), None)
    if monitor is None:
        raise CheckpointError(f"no checkpoint in {store.root} records a monitored metric, so none is 'best'; "
                              "set checkpoint.monitor and report it with session.report()")
    name, mode = monitor["name"], monitor["mode"]
    values = {m.step: metric_value(m.meta, name) for m in manifests}
    order = rank_steps(((s, v) for s, v in values.items() if v is not None), mode)
    by_step = {m.step: m for m in manifests}
    return name, mode, [by_step[s] for s in order]


def _valid_monitor(monitor: Any) -> bool:
    return isinstance(monitor, dict) and isinstance(monitor.get("name"), str) and monitor.get("mode") in ("min", "max")


def candidates(store: CheckpointStore, which: int | str) -> list[Manifest]:
    """Manifests to try for ``which``, in order: one for a step; newest (or best) first otherwise."""
    if which == "latest":
        return list(store.candidates())
    if which == "best":
        return best_ranking(store)[2]
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
    ckpt_dir = store.path(manifest.step)
    record0 = read_shard_record(ckpt_dir, manifest, 0)
    for rank in range(1, manifest.world_size):  # verify every record, even though rank 0 holds the tree
        read_shard_record(ckpt_dir, manifest, rank)
    prefix = f"{REPLICATED}/{keep}/" if keep is not None else f"{REPLICATED}/"
    tensors: dict[str, torch.Tensor] = {}
    for rank in range(manifest.world_size):
        tensors.update(read_shard_tensors(ckpt_dir, manifest, rank, keep=lambda n: n.startswith(prefix)))
    tree = record0.trees.get(REPLICATED)
    if not isinstance(tree, dict):
        raise CorruptCheckpoint(str(ckpt_dir / layout.shard_names(0)[0]), "replicated state tree missing")
    if keep is not None:
        if keep not in tree:  # meta lists it (check_object passed) but the tree lacks it: damage, so fall back
            raise CorruptCheckpoint(str(ckpt_dir / layout.shard_names(0)[0]),
                                    f"object {keep!r} is listed in the manifest but missing from the state tree")
        tree = {keep: tree[keep]}
    try:
        return {name: codec.decode(sub, tensors.__getitem__) for name, sub in tree.items()}
    except (CheckpointError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(str(ckpt_dir), f"malformed state tree ({e})") from None


def load(store: CheckpointStore, which: int | str, *, name: str | None = None) -> tuple[Manifest, dict[str, Any]]:
    """The first checkpoint for ``which`` that reads back intact, and its replicated objects (or just ``name``).

    ``latest`` and ``best`` fall back past damaged checkpoints with a warning; an
    explicit step raises :class:`CorruptCheckpoint` if it is damaged.
    """
    tried = candidates(store, which)
    if not tried:
        raise CheckpointError(f"no valid checkpoint in {store.root} (see `ftrain ckpt ls {store.root}`)")
    last_error: CorruptCheckpoint | None = None
    for manifest in tried:
        try:
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
