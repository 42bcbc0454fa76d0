"""The supervisor's only source of time: an injectable clock, so its loop can run on fake time in tests.

Two clocks, deliberately distinct: ``monotonic()`` measures intervals (poll cadence, grace
deadlines, backoff), and ``time()`` is the wall clock, the one workers stamp their heartbeats
with (same host), so hang detection compares like with like. ``sleep`` is part of the clock so a
fake clock can advance both when the supervisor waits.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What the supervisor needs of time.

    Invariants an implementation keeps: ``monotonic()`` never decreases; ``sleep(s)`` (``s >= 0``)
    returns once ``monotonic()`` has advanced by at least ``s``; ``time()`` is seconds since the
    epoch on the same clock the job's heartbeats use.
    """

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks of this host: :func:`time.monotonic`, :func:`time.time`, :func:`time.sleep`.

    Looked up on every call (not bound once) so the behaviour is exactly that of calling the
    ``time`` module directly.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


#: The default clock of every supervisor.
SYSTEM_CLOCK: Clock = SystemClock()

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]
