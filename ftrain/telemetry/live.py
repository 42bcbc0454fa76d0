"""The state of a run now, from its event log and its ranks' heartbeats (``ftrain status``, the progress line).

:func:`status_of` is pure: events (docs/FORMAT.md, "Event log") and heartbeats in,
a :class:`Status` out, so it is tested on synthetic logs. :func:`read_status`
gathers the inputs from a checkpoint directory.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrain.attempt import AttemptFiles, Heartbeat
from ftrain.errors import printable
from ftrain.events import integer as _int
from ftrain.events import number as _num
from ftrain.events import read_events, text

#: Seconds of progress events the step rate is measured over.
RATE_WINDOW = 60.0


@dataclass
class RankState:
    node: str
    rank: int
    phase: str
    step: int
    age: float


@dataclass
class Status:
    run: str | None = None
    #: no events, starting, restoring, running, saving, stopping, backoff, finished, preempted, failed
    state: str = "no events"
    attempt: int | None = None
    attempt_age: float | None = None
    step: int | None = None
    steps_per_s: float | None = None
    total_steps: int | None = None
    eta: float | None = None
    newest_step: int | None = None
    newest_age: float | None = None
    restarts: int = 0
    budget: int | None = None
    world: int | None = None
    ranks: list[RankState] = field(default_factory=list)
    #: The last few failures and stops, one line each.
    recent: list[str] = field(default_factory=list)
    attempt_dirs: list[str] = field(default_factory=list)
    last_event_age: float | None = None


def _str(e: dict[str, Any], key: str) -> str:
    return printable(text(e, key))  # everything shown comes from an untrusted file


def newest_run(events: Sequence[dict[str, Any]]) -> str | None:
    return _str(events[-1], "run") or None if events else None


Beats = dict[str, dict[int, Heartbeat]]


def status_of(events: Sequence[dict[str, Any]], beats: Beats | Callable[[list[str]], Beats], now: float,
              run: str | None = None) -> Status:
    """The state of ``run`` (default: the newest) at wall time ``now``; ``beats``: heartbeats per attempt
    directory, or what reads them given the current attempt's directories."""
    run = run or newest_run(events)
    mine = [e for e in events if _str(e, "run") == (run or "")]
    st = Status(run=run)
    if not mine:
        return st
    st.last_event_age = now - mine[-1]["t"]
    sup = [e for e in mine if e.get("src") == "supervisor"]
    launch = next((e for e in reversed(sup) if e["ev"] == "launch"), None)
    since = launch["t"] if launch is not None else mine[0]["t"]
    if launch is not None:
        st.budget = _int(launch, "max_restarts")
    current = [e for e in mine if e["t"] >= since]
    attempt_start = None
    for e in current:
        ev = e["ev"]
        if ev == "attempt_start":
            attempt_start = e
            st.attempt = _int(e, "attempt")
            st.attempt_age = now - e["t"]
        elif ev == "attempt_end" and _str(e, "outcome") in ("failed", "hung"):
            st.restarts += 1
            st.recent.append(f"attempt {_int(e, 'attempt')} {_str(e, 'outcome')}: {_str(e, 'detail')}")
        elif ev == "group_end":
            if e.get("counted"):
                st.restarts += 1
            st.recent.append(f"worker group {_int(e, 'group')} {_str(e, 'ending')}: {_str(e, 'detail')}")
        elif ev in ("signal", "notice"):
            st.recent.append(f"stop requested: {_str(e, 'name') or _str(e, 'source') + ' notice'}")
    for e in mine:  # checkpoints and the plan carry over from earlier launches of the run
        if e["ev"] == "committed" and (step := _int(e, "step")) is not None:
            if st.newest_step is None or step >= st.newest_step:
                st.newest_step, st.newest_age = step, now - e["t"]
        elif e["ev"] == "session_start" and (total := _int(e, "total_steps")) is not None:
            st.total_steps = total
        if e["ev"] == "session_start" and (w := _int(e, "world")) is not None:
            st.world = w
    st.state = _state(current, attempt_start)
    if attempt_start is not None:
        st.attempt_dirs = sorted({_str(e, "dir") for e in current if e["ev"] == "attempt_start"
                                  and e["t"] >= attempt_start["t"] - 1.0 and _str(e, "dir")})
    begun = attempt_start["t"] if attempt_start is not None else since
    # (when, step completed): a save's step was complete when its snapshot started
    progress = [(_num(e, "start") or e["t"] if e["ev"] == "save" else e["t"], s) for e in current
                if e["ev"] in ("progress", "first_step", "save") and e.get("src") == "worker" and e["t"] >= begun
                and (s := _int(e, "step")) is not None]
    if progress:
        st.step = progress[-1][1]
        window = [p for p in progress if p[0] >= progress[-1][0] - RATE_WINDOW]
        if len(window) >= 2 and window[-1][0] > window[0][0] and window[-1][1] >= window[0][1]:
            st.steps_per_s = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
    if callable(beats):
        beats = beats(st.attempt_dirs)
    for node, node_beats in sorted(beats.items()):
        for rank, b in sorted(node_beats.items()):
            st.ranks.append(RankState(node, rank, b.phase, b.step, max(0.0, now - b.time)))
    live = [r.step for r in st.ranks if r.phase == "step"]
    if live and st.state in ("running", "saving") and (st.step is None or min(live) > st.step):
        st.step = min(live)  # heartbeats are fresher than the last progress event
    if st.total_steps is not None and st.step is not None and st.steps_per_s and st.state not in (
            "finished", "failed"):
        st.eta = max(0, st.total_steps - st.step) / st.steps_per_s
    st.recent = st.recent[-4:]
    return st


def _state(events: Sequence[dict[str, Any]], attempt_start: dict[str, Any] | None) -> str:
    last_sup = next((e for e in reversed(events) if e.get("src") == "supervisor"), None)
    if last_sup is not None and last_sup["ev"] == "launch_end":
        code = _int(last_sup, "exit_code")
        return "finished" if code == 0 else "preempted" if code == 75 else "failed"
    if last_sup is not None and last_sup["ev"] == "backoff":
        return "backoff"
    after = [e for e in events if attempt_start is None or e["t"] >= attempt_start["t"]]
    if any(e["ev"] in ("signal", "notice") for e in after):
        return "stopping"
    work = [e for e in after if e.get("src") == "worker"]
    if not work:
        return "starting"
    kinds = {e["ev"] for e in work}
    if "first_step" in kinds or "progress" in kinds:
        return "running"
    return "restoring" if "session_start" in kinds else "starting"


def read_status(root: str | os.PathLike[str], run: str | None = None, now: float | None = None) -> Status:
    """Gather the event log and the current attempts' heartbeats under checkpoint dir ``root``."""
    def heartbeats(dirs: list[str]) -> Beats:
        return {d: AttemptFiles(d).read_heartbeats() for d in dirs if Path(d).is_dir()}

    return status_of(read_events(root), heartbeats, time.time() if now is None else now, run)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(st: Status) -> str:
    """One line: the supervisor prints it every ``supervisor.progress_seconds``."""
    step = "-" if st.step is None else str(st.step) + (f"/{st.total_steps}" if st.total_steps else "")
    rate = f" ({st.steps_per_s:.2f} steps/s)" if st.steps_per_s is not None else ""
    ckpt = (f"newest checkpoint step {st.newest_step} ({_age(st.newest_age)} ago)" if st.newest_step is not None
            else "no checkpoint yet")
    budget = f"/{st.budget}" if st.budget is not None else ""
    eta = f", ETA {_age(st.eta)}" if st.eta is not None else ""
    return f"attempt {st.attempt} {st.state}: step {step}{rate}, {ckpt}, restarts {st.restarts}{budget}{eta}"


def format_status(st: Status, root: str) -> str:
    """A screenful: the run, its attempt, step and speed, checkpoints, each rank's heartbeat, recent trouble."""
    if st.run is None:
        return f"no event log under {printable(root)}/events (not run with this version of ftrain, or not started)"
    lines = [f"run {st.run} in {printable(root)}",
             f"  state      {st.state}" + (f" (last event {_age(st.last_event_age)} ago)"
                                           if st.last_event_age is not None else ""),
             f"  attempt    {st.attempt if st.attempt is not None else '-'}"
             + (f", started {_age(st.attempt_age)} ago" if st.attempt_age is not None else "")
             + (f", {st.world} rank(s)" if st.world else ""),
             f"  step       {'-' if st.step is None else st.step}"
             + (f" of {st.total_steps}" if st.total_steps else "")
             + (f", {st.steps_per_s:.2f} steps/s" if st.steps_per_s is not None else "")
             + (f", ETA {_age(st.eta)}" if st.eta is not None else ""),
             "  checkpoint " + (f"step {st.newest_step}, committed {_age(st.newest_age)} ago"
                                if st.newest_step is not None else "none committed yet"),
             f"  restarts   {st.restarts}" + (f" of {st.budget}" if st.budget is not None else "")]
    if st.ranks:
        lines.append("  heartbeats (rank: phase step, age)")
        many = len({r.node for r in st.ranks}) > 1
        for r in st.ranks[:32]:
            where = f" [{printable(Path(r.node).name)}]" if many else ""
            lines.append(f"    rank {r.rank}{where}: {printable(r.phase)} {r.step}, {_age(r.age)} ago")
        if len(st.ranks) > 32:
            lines.append(f"    ... and {len(st.ranks) - 32} more")
    if st.recent:
        lines.append("  recent")
        lines.extend(f"    {line}" for line in st.recent)
    return "\n".join(lines)
