"""What asked a launch to stop: a preemption signal to ``ftrain launch`` or a preemption notice (pure, light).

Both stop the job the same way (every worker saves and exits, exit 75), but only signals count towards "a
second signal means stop now": a platform that sends a notice usually sends its own SIGTERM next, and that must
start the save, not cut it short. Kept apart from the supervisor's loop, and free of heavy imports, because
``ftrain launch`` records the signals it receives before it has imported the supervisor (ftrain/cli/launch.py).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class StopKind(enum.Enum):
    SIGNAL = "signal"  # a preemption signal to this process: ``name`` is the signal's, e.g. "SIGTERM"
    NOTICE = "notice"  # a preemption notice (ftrain/supervisor/notices/): ``name`` is the notice's, e.g. "aws notice"


@dataclass(frozen=True)
class StopRequest:
    """One request to stop, as it arrived; the supervisor keeps them in arrival order (``Supervisor.stops``)."""

    kind: StopKind
    name: str

    @classmethod
    def signal(cls, name: str) -> StopRequest:
        return cls(StopKind.SIGNAL, name)

    @classmethod
    def notice(cls, name: str) -> StopRequest:
        return cls(StopKind.NOTICE, name)


__all__ = ["StopKind", "StopRequest"]
