"""Hang detection from heartbeats: a pure function of what the workers last reported and the time.

Each phase has its own allowance, so time spent in a save or a restore is not
mistaken for a hang, and the first step gets longer (imports, rendezvous,
restore).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ftrain.attempt import EXITING, RESTORING, SAVING, STARTING, Heartbeat


@dataclass(frozen=True)
class HangLimits:
    hang_timeout: float      # 0 disables detection
    startup_timeout: float
    save_timeout: float      # allowance inside a save (commit included)
    exit_timeout: float      # allowance while exiting after a preemption save


def find_hung(beats: dict[int, Heartbeat], expected: int, started_at: float, now: float,
              limits: HangLimits) -> str | None:
    """Describe the hung rank (the one silent longest past its allowance), or None if all are alive.

    ``expected`` is how many local ranks should report; ranks that never wrote a
    heartbeat are judged against the startup allowance from ``started_at``.
    """
    if limits.hang_timeout <= 0:
        return None
    allowance = {STARTING: limits.startup_timeout, RESTORING: limits.startup_timeout,
                 SAVING: limits.save_timeout, EXITING: limits.exit_timeout}
    if len(beats) < expected and now - started_at > limits.startup_timeout:
        return (f"{expected - len(beats)} rank(s) never reported progress within "
                f"supervisor.startup_timeout_seconds={limits.startup_timeout:g}")
    worst: tuple[float, int, Heartbeat] | None = None
    for rank, beat in beats.items():
        over = now - beat.time - allowance.get(beat.phase, limits.hang_timeout)
        if over > 0 and (worst is None or (beat.step, -over) < (worst[2].step, -worst[0])):
            worst = (over, rank, beat)
    if worst is None:
        return None
    _, rank, beat = worst
    return (f"rank {rank} made no progress for {now - beat.time:.0f}s (last: {beat.phase} at step {beat.step}; "
            f"supervisor.hang_timeout_seconds={limits.hang_timeout:g})")


#: ``import ftrain``, ``import os, ftrain as f``, ``from ftrain import Session``, ``from ftrain.x import y``.
_IMPORTS_FTRAIN = re.compile(rb"^[ \t]*(?:from[ \t]+ftrain\b|import[ \t]+(?:[\w.]+(?:[ \t]+as[ \t]+\w+)?[ \t]*,[ \t]*)*"
                             rb"ftrain\b)", re.M)


def reports_progress(script: str | Path) -> bool:
    """Whether the workers of ``script`` are expected to report through ``ftrain.Session`` (heartbeats): True
    unless its source can be read and imports nothing of ftrain. A script that never reports (a plain torchrun
    script) is not judged against the startup allowance, which would kill it as hung once it ran that long, and
    its attempts count as progress (see ``policy.AttemptResult.new_checkpoint``). One that imports ftrain only
    through another module is seen as reporting as soon as its first heartbeat arrives."""
    try:
        with open(script, "rb") as f:
            source = f.read(1 << 20)
    except OSError:
        return True  # unknown: keep every check
    return bool(_IMPORTS_FTRAIN.search(source))
