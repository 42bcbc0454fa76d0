"""Checkpoint storage: the on-disk format (docs/FORMAT.md) and the commit protocol.

Modules: ``layout`` (names, durable writes), ``checksum``, ``codec`` (state trees
without pickle), ``manifest``, ``shard`` (one rank's files), ``store`` (discovery,
validation, commit, retention).
"""
from __future__ import annotations

from ftrain.checkpoint.manifest import FORMAT_VERSION, Manifest
from ftrain.checkpoint.store import CheckpointInfo, CheckpointStore

__all__ = ["FORMAT_VERSION", "CheckpointInfo", "CheckpointStore", "Manifest"]
