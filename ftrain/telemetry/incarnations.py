"""Who ran when, from a run's event log (pure): the launches (nodes), rank 0's incarnations, and each node's
worker incarnations, for :mod:`ftrain.telemetry.timeline` to paint.

* A :class:`Node` is one ``ftrain launch`` (docs/FORMAT.md, "Event log": ``node`` is ``<host>/<its pid>``).
* A :class:`Life` is one process of the job's global rank 0: the job's progress (restore, steps, saves,
  commits) is the same on every rank, so rank 0 alone records it.
* A :class:`Workers` is one process of a node's local rank 0 (its ``session_start``), matched to the rank-0
  life of the same worker group: the job's work that this node took part in.

Input is untrusted: fields of the wrong type are ignored.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ftrain.events import Ev
from ftrain.events import integer as _int
from ftrain.events import number as _num
from ftrain.events import text as _str


def or_(value: float | None, default: float) -> float:
    return default if value is None else value


def multi_node(nnodes: object) -> bool:
    """Whether a ``launch`` event's ``nnodes`` ([MIN, MAX]) is a multi-node launch's."""
    return isinstance(nnodes, list) and any(isinstance(x, int) and not isinstance(x, bool) and x > 1 for x in nnodes)


@dataclass
class Life:
    """One incarnation of the job's rank 0: a worker process from its start to its end."""

    node: str
    pid: int | None
    number: int | None
    proc_start: float
    first: float
    last: float
    restore_start: float | None = None
    restore_end: float | None = None
    restored: int = 0
    found: bool = False
    points: list[tuple[float, int]] = field(default_factory=list)  # (time, step completed)
    saves: list[tuple[float, float, int]] = field(default_factory=list)  # (start, blocking, step)
    commits: list[tuple[float, int]] = field(default_factory=list)
    #: When it recorded ``preempted``: it saved and exited because it was told to stop. Whether that was a
    #: preemption or torchrun stopping the workers to admit a node is ``preemption`` (:func:`stop_causes`).
    stopped: float | None = None
    preemption: bool = False
    finished: tuple[float, int | None] | None = None
    end: float = 0.0

    @property
    def work_start(self) -> float:
        return self.restore_end if self.restore_end is not None else self.first

    def time_of(self, step: int) -> float:
        """When this incarnation completed ``step`` (its restored step: when work began)."""
        if step <= self.restored:
            return self.work_start
        if self.finished is not None and self.finished[1] == step:
            return self.finished[0]  # its last step: all of its work counts, the final save's wait included
        for start, _, s in self.saves:
            if s == step:
                return start
        pts = sorted([(self.work_start, self.restored), *self.points])
        for (t0, s0), (t1, s1) in pairwise(pts):
            if s0 <= step <= s1 and s1 > s0:
                return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        return self.end  # beyond what it reported: it got that far before it ended


def rank0_lives(events: Sequence[dict[str, Any]], boundaries: dict[str, list[float]],
                regroups: list[float]) -> list[Life]:
    """Rank 0's incarnations, oldest first; each ends at the first supervisor boundary of its node after it,
    else (its node killed whole) at the first worker group's end on any node: the whole job's group ended then."""
    found: dict[tuple[str, int | None], Life] = {}
    for e in events:
        if e.get("src") != "worker" or _int(e, "rank") != 0:
            continue
        key = (_str(e, "node"), _int(e, "pid"))
        t, ev = e["t"], e["ev"]
        life = found.get(key)
        if life is None:
            start = _num(e, "proc_start") if ev == Ev.SESSION_START else None
            life = found[key] = Life(key[0], key[1], _int(e, "attempt"), min(or_(start, t), t), t, t)
        life.last = max(life.last, t)
        step = _int(e, "step")
        if ev == Ev.RESTORE and step is not None:
            start = _num(e, "start")
            seconds = _num(e, "seconds")
            life.restore_start = start if start is not None else t
            life.restore_end = life.restore_start + seconds if seconds is not None else t
            life.restored, life.found = step, bool(e.get("found"))
        elif ev in (Ev.FIRST_STEP, Ev.PROGRESS) and step is not None:
            life.points.append((t, step))
        elif ev == Ev.SAVE and step is not None:
            start = _num(e, "start")
            blocking = _num(e, "blocking")
            if start is not None and blocking is not None and blocking >= 0:
                life.saves.append((start, blocking, step))
                life.points.append((start, step))
        elif ev == Ev.COMMITTED and step is not None:
            life.commits.append((t, step))
        elif ev == Ev.PREEMPTED:
            life.stopped = t
        elif ev == Ev.FINISHED:
            life.finished = (t, step)
    out = sorted(found.values(), key=lambda x: x.first)
    for life in out:
        if life.finished is not None:
            life.end = life.finished[0]
        elif life.stopped is not None:
            life.end = life.stopped
        else:
            own = after(boundaries.get(life.node, []), life.last)
            regroup = after(regroups, life.last)
            life.end = own if own is not None else regroup if regroup is not None else life.last
    return out


def after(times: list[float], t: float) -> float | None:
    """The first of the sorted ``times`` at or after ``t``."""
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None


@dataclass
class Node:
    """One ``ftrain launch`` of the run: a node (several may share a host)."""

    node: str
    host: str
    start: float
    end: float
    ended: bool = False  # it recorded launch_end (a node killed whole did not)
    multi: bool = False  # a multi-node launch (its launch event's nnodes), where groups change with membership
    label: str = ""


@dataclass
class Workers:
    """One incarnation of a node's workers (its local rank 0's process) and the rank-0 incarnation of the
    same worker group (``life``: the job's work, which these workers shared while they were part of it)."""

    node: str
    pid: int | None
    start: float
    first: float
    last: float
    end: float = 0.0
    life: Life | None = None


def launches(sup: list[dict[str, Any]]) -> dict[str, Node]:
    """Every launch, spanning [its process start, its last event]; a node's workers extend it (see build)."""
    nodes: dict[str, Node] = {}
    for e in sup:
        name, t, ev = _str(e, "node"), e["t"], e["ev"]
        n = nodes.get(name)
        if n is None:
            n = nodes[name] = Node(name, _str(e, "host") or name.rsplit("/", 1)[0], t, t)
        n.end = max(n.end, t)
        if ev == Ev.LAUNCH:
            n.start = min(n.start, or_(_num(e, "proc_start"), t))
            n.multi = n.multi or multi_node(e.get("nnodes"))
        elif ev == Ev.LAUNCH_END:
            n.ended = True
    return nodes


def node_workers(events: Sequence[dict[str, Any]], boundaries: dict[str, list[float]],
                 lives: list[Life]) -> list[Workers]:
    """Each node's worker incarnations (local rank 0's ``session_start``, and rank 0's own events), matched to
    the rank-0 incarnation alive when they started their session: the job's work they took part in."""
    found: dict[tuple[str, int | None], Workers] = {}
    for e in events:
        if e.get("src") != "worker" or not (_int(e, "rank") == 0 or (e["ev"] == Ev.SESSION_START
                                                                     and _int(e, "local_rank") == 0)):
            continue
        key = (_str(e, "node"), _int(e, "pid"))
        t = e["t"]
        w = found.get(key)
        if w is None:
            start = _num(e, "proc_start") if e["ev"] == Ev.SESSION_START else None
            w = found[key] = Workers(key[0], key[1], min(or_(start, t), t), t, t)
        w.last = max(w.last, t)
    out = sorted(found.values(), key=lambda x: x.start)
    for w in out:
        alive = [life for life in lives if life.proc_start - 1.0 <= w.first <= life.end + 1.0]
        w.life = min(alive, key=lambda life: abs(life.proc_start - w.start), default=None)
        own = after(boundaries.get(w.node, []), w.last)
        # A node killed whole records no end of its own: its workers took part until the group ended.
        w.end = own if own is not None else max(w.last, w.life.end) if w.life is not None else w.last
    return out


def kept_steps(lives: list[Life], newest_commit: int | None) -> list[int]:
    """For each incarnation, the last step of its work that counts: the step the next one restored."""
    kept = []
    for i, life in enumerate(lives):
        if i + 1 < len(lives):
            kept.append(lives[i + 1].restored)
        elif life.finished is not None and life.finished[1] is not None:
            kept.append(life.finished[1])
        else:  # the last one, cut short: what a relaunch would resume from
            kept.append(newest_commit if newest_commit is not None else life.restored)
    return kept


def stop_causes(lives: list[Life], sup: list[dict[str, Any]], nodes: dict[str, Node]) -> None:
    """Set which stops were preemptions. A worker records ``preempted`` whenever it saved and exited because it
    was told to, but in a multi-node launch torchrun also stops the workers (SIGTERM) to admit a node: that is a
    membership change. A preemption is a signal or a notice that a supervisor (of any node: the ranks agree to
    stop together) received since the previous incarnation ended."""
    stops = [e["t"] for e in sup if e["ev"] in (Ev.SIGNAL, Ev.NOTICE)]
    previous = -math.inf
    for life in lives:
        if life.stopped is not None:
            node = nodes.get(life.node)
            told = any(previous <= t <= life.end + 1.0 for t in stops)
            life.preemption = told or node is None or not node.multi  # no launcher, or a single node: as recorded
        previous = life.end
