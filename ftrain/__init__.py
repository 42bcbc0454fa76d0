"""ftrain: fault-tolerant, exactly-resumable distributed PyTorch training.

The training-script API is :class:`Session`; data position comes from
:class:`ResumableLoader`. See docs/architecture.md for the tree: the
supervisor side (``cli``, ``supervisor``), the worker side (``session``,
``data``, ``finetune``), the storage leaf (``checkpoint``) and the contracts
both sides share (``attempt``, ``envvars``, ``exitcodes``, ``errors``,
``config``, ``faults``, ``signals``, ``stateful``, ``hashing``).

Typed (``py.typed``): every name in ``__all__`` has its real type for a type
checker, although most are loaded on first use (see ``_LAZY``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from ftrain.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    FtrainError,
    NoValidCheckpoint,
    StateMismatch,
    UsageError,
)
from ftrain.stateful import Counters, Stateful

if TYPE_CHECKING:
    # What a type checker sees; at run time ``__getattr__`` below loads the same names on first use.
    # Keep the two in step: tests/unit/test_public_api.py checks that every lazy name resolves.
    from ftrain.config import (
        CheckpointConfig,
        DataConfig,
        EarlyStoppingConfig,
        FtrainConfig,
        LeaseConfig,
        NoticesConfig,
        RemoteConfig,
        RetentionConfig,
        SelectionConfig,
        SupervisorConfig,
    )
    from ftrain.data import ResumableLoader, ResumableSampler, SeededDataset, derive_seed
    from ftrain.hashing import state_sha256
    from ftrain.session import Session
    from ftrain.session.liveness import Preempted

#: Loaded on first use, name -> module. Session and the data helpers import torch, so ``import ftrain`` (and with
#: it ``ftrain ckpt ...`` and the launcher) must not; the config pulls in yaml, which few importers need.
_LAZY: dict[str, str] = {
    "Session": "ftrain.session",
    "ResumableLoader": "ftrain.data",
    "ResumableSampler": "ftrain.data",
    "SeededDataset": "ftrain.data",
    "derive_seed": "ftrain.data",
    "Preempted": "ftrain.session.liveness",
    "state_sha256": "ftrain.hashing",
    "CheckpointConfig": "ftrain.config",
    "DataConfig": "ftrain.config",
    "EarlyStoppingConfig": "ftrain.config",
    "FtrainConfig": "ftrain.config",
    "LeaseConfig": "ftrain.config",
    "NoticesConfig": "ftrain.config",
    "RemoteConfig": "ftrain.config",
    "RetentionConfig": "ftrain.config",
    "SelectionConfig": "ftrain.config",
    "SupervisorConfig": "ftrain.config",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpoint",
    "Counters",
    "DataConfig",
    "EarlyStoppingConfig",
    "FtrainConfig",
    "FtrainError",
    "LeaseConfig",
    "NoValidCheckpoint",
    "NoticesConfig",
    "Preempted",
    "RemoteConfig",
    "ResumableLoader",
    "ResumableSampler",
    "RetentionConfig",
    "SeededDataset",
    "SelectionConfig",
    "Session",
    "StateMismatch",
    "Stateful",
    "SupervisorConfig",
    "UsageError",
    "__version__",
    "derive_seed",
    "state_sha256",
]
