"""Storage leaf (both sides of the process boundary): the on-disk checkpoint format and its commit protocol.

Imports nothing from the worker or supervisor side, nor the config: callers pass
plain values. The format is specified in docs/FORMAT.md. Modules: ``format``
(names), ``storage`` (the storage interface and the local filesystem),
``checksum``, ``codec`` (state trees without pickle), ``manifest``, ``shard``
(one rank's files), ``snapshot`` (copy to host, persist), ``writer`` (the
background thread), ``store`` (discovery, validation, commit, retention),
``reader`` (a whole checkpoint in one process, for tools), ``lease`` and
``lease_rules`` (one writing job per root).
"""
from __future__ import annotations

from ftrain.checkpoint.manifest import FORMAT_VERSION, Manifest
from ftrain.checkpoint.store import CheckpointInfo, CheckpointStore

__all__ = ["FORMAT_VERSION", "CheckpointInfo", "CheckpointStore", "Manifest"]
