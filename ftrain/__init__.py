"""ftrain: fault-tolerant, exactly-resumable distributed PyTorch training.

The training-script API is :class:`Session`; data position comes from
:class:`ResumableLoader`. See README.md ("Architecture") for the tree: the
supervisor side (``cli``, ``supervisor``), the worker side (``session``,
``data``, ``finetune``), the storage leaf (``checkpoint``) and the contracts
both sides share (``attempt``, ``envvars``, ``exitcodes``, ``errors``,
``config``, ``faults``, ``signals``, ``stateful``, ``hashing``).
"""
from __future__ import annotations

__version__ = "0.1.0"

from ftrain.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    FtrainError,
    NoValidCheckpoint,
    StateMismatch,
)
from ftrain.stateful import Counters, Stateful


def __getattr__(name: str) -> object:
    # Session and the data helpers import torch: load them on first use so that
    # `ftrain ckpt ...` and the launcher start fast.
    if name == "Session":
        from ftrain.session import Session

        return Session
    if name in ("ResumableLoader", "ResumableSampler", "SeededDataset", "derive_seed"):
        from ftrain import data

        return getattr(data, name)
    if name == "Preempted":
        from ftrain.session.liveness import Preempted

        return Preempted
    if name == "state_sha256":
        from ftrain.hashing import state_sha256

        return state_sha256
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpoint",
    "Counters",
    "FtrainError",
    "NoValidCheckpoint",
    "Preempted",
    "ResumableLoader",
    "ResumableSampler",
    "SeededDataset",
    "Session",
    "StateMismatch",
    "Stateful",
    "__version__",
    "derive_seed",
    "state_sha256",
]
