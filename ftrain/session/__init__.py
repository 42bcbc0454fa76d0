"""Worker side: everything that runs inside each training process, behind the :class:`Session` façade.

Modules: ``session`` (the façade the script calls), ``decision`` (the per-step
decision, pure), ``checkpointer`` (the save/restore protocol across ranks),
``registry`` (what is saved per registered object), ``selection`` and
``ranking`` (model selection: the session's bookkeeping, and the pure
ranking), ``trainable`` (frozen flags, trainable-only state), ``liveness``
(preemption flag, heartbeats, crash reports, process hooks), ``teardown`` (a
clean interpreter exit with gloo's threads alive), ``collectives`` (the few
collectives ftrain needs), ``rng`` (every RNG stream).

The data flow: the script calls the Session; the Session captures state
through the registry and hands it to the checkpointer, which snapshots it and
passes it to the storage leaf (``ftrain.checkpoint``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftrain.session.session import Session


def __getattr__(name: str) -> object:
    # Lazily: importing the package must not import torch (the session imports it).
    if name == "Session":
        from ftrain.session.session import Session

        return Session
    raise AttributeError(f"module 'ftrain.session' has no attribute {name!r}")


__all__ = ["Session"]
