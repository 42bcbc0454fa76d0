"""A run's history from its event log: every second of wall time in exactly one bucket (pure).

Goodput is productive step time over wall time, after Google's ML Goodput
Measurement; the badput buckets (docs/goodput.md) are:

* ``startup``: a process starting until it restores (the launcher's imports, the workers' imports,
  process-group init, building the model);
* ``rendezvous``: an attempt's (or a worker group's) start until its workers run: torchrun's own
  start and its rendezvous, the wait for the other nodes included;
* ``restore``: reading and verifying the checkpoint;
* ``save``: the training thread blocked by a save (the whole save when synchronous, the snapshot when not);
* ``lost``: steps done after the checkpoint the next attempt resumed from: done again, so not productive;
* ``hang``: from a hung rank's last heartbeat until the hang detector killed it;
* ``backoff``: the restart policy's delay;
* ``other``: everything else while a launch runs (detecting a failure and tearing the job down,
  the exit after the final save, the teardown after the last step);
* ``down``: between launches: nothing of the run was running (the scheduler's time).

How: each event is turned into labelled intervals, and the wall time is
painted with them, the most specific label winning where they overlap
(:data:`PRIORITY`), and ``down``/``other`` where none applies (:func:`paint`);
the buckets are the painted lengths, so they sum to the wall time by
construction. The step a later attempt restored decides, for each attempt,
where its productive time ends and its lost time begins.

A multi-node job is one timeline over every node's events (the nodes' logs
merged: :func:`ftrain.events.read_events` takes several directories). The job
lane paints every node's intervals together; each node's lane paints only its
own: its launcher, its rendezvous, its workers' startup, and the job's work
(rank 0's, the same on every rank) while its workers were part of the job
(:class:`Workers`). A node killed whole leaves no ``launch_end``: its lane
ends where its workers' group ended.

Input is untrusted (docs/FORMAT.md, "Event log"): fields of the wrong type are ignored.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ftrain.events import Ev
from ftrain.events import integer as _int
from ftrain.events import number as _num
from ftrain.events import text as _str
from ftrain.telemetry.incarnations import (
    Life,
    Node,
    Workers,
    kept_steps,
    launches,
    node_workers,
    or_,
    rank0_lives,
    stop_causes,
)

BUCKETS = ("productive", "startup", "rendezvous", "restore", "save", "lost", "hang", "backoff", "other", "down")
#: Where intervals overlap, the first of these wins.
PRIORITY = ("save", "restore", "hang", "productive", "lost", "backoff", "rendezvous", "startup", "other", "down")
_RANK = {b: i for i, b in enumerate(PRIORITY)}


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    bucket: str


@dataclass(frozen=True)
class Mark:
    t: float
    kind: str  # commit, failure, hang, preemption, restore
    text: str


@dataclass
class Lane:
    """One attempt of a single-node launch, or one node of a multi-node launch (``<host> launch <n>``: the
    host's n-th launch of the run), painted with that node's own timeline."""

    label: str
    node: str
    start: float
    end: float
    segments: list[Segment] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    @property
    def buckets(self) -> dict[str, float]:
        return _sum(self.segments)


@dataclass
class Timeline:
    start: float
    end: float
    job: list[Segment]
    lanes: list[Lane]
    buckets: dict[str, float]
    #: attempts (worker incarnations), unplanned (ended with work lost), preemptions (stopped by a signal or a
    #: notice to a supervisor), membership (ended by a membership change: torchrun stopping the workers to
    #: admit a node, or a lost peer), saves, commits, restores
    counts: dict[str, int]
    #: Each save's blocking seconds; each restart's recovery seconds (end of work to work again, ``down`` excluded)
    save_costs: list[float]
    recoveries: list[float]
    #: Seconds of productive training between consecutive scheduled saves (the interval in use), if seen.
    save_interval: float | None

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def goodput(self) -> float:
        return self.buckets["productive"] / self.wall if self.wall > 0 else 0.0

    @property
    def running_goodput(self) -> float:
        """Goodput over the time a launch was running (``down`` left out)."""
        running = self.wall - self.buckets["down"]
        return self.buckets["productive"] / running if running > 0 else 0.0


# ------------------------------------------------------------------ helpers
def duration(seconds: float) -> str:
    """A length of time for people: ``27.3s``, ``4m05s``, ``1h02m03s``."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m // 60}h{m % 60:02d}m{sec:02d}s" if m >= 60 else f"{m}m{sec:02d}s"


# ------------------------------------------------------------------ painting
def paint(intervals: Iterable[tuple[float, float, str]], start: float, end: float,
          fill: str = "other") -> list[Segment]:
    """Cover [start, end] with segments: at every instant the highest-priority interval's bucket, else ``fill``."""
    edges: list[tuple[float, int, str]] = []
    for a, b, bucket in intervals:
        a, b = max(a, start), min(b, end)
        if b > a:
            edges += [(a, 1, bucket), (b, -1, bucket)]
    edges.sort(key=lambda x: x[0])
    active: dict[str, int] = defaultdict(int)
    out: list[Segment] = []
    cursor = start
    i = 0
    while cursor < end:
        while i < len(edges) and edges[i][0] <= cursor:
            active[edges[i][2]] += edges[i][1]
            i += 1
        nxt = edges[i][0] if i < len(edges) else end
        bucket = min((b for b, n in active.items() if n > 0), key=_RANK.__getitem__, default=fill)
        if nxt > cursor:
            if out and out[-1].bucket == bucket and out[-1].end == cursor:
                out[-1] = Segment(out[-1].start, nxt, bucket)
            else:
                out.append(Segment(cursor, nxt, bucket))
        cursor = nxt
    return out


def _clip(segments: Sequence[Segment], a: float, b: float) -> list[Segment]:
    return [Segment(max(s.start, a), min(s.end, b), s.bucket) for s in segments if s.end > a and s.start < b]


def _sum(segments: Iterable[Segment]) -> dict[str, float]:
    out = dict.fromkeys(BUCKETS, 0.0)
    for s in segments:
        out[s.bucket] = out.get(s.bucket, 0.0) + (s.end - s.start)
    return out


# ------------------------------------------------------------------ building
Interval = tuple[float, float, str]


def build(events: Sequence[dict[str, Any]]) -> Timeline | None:
    """The timeline of every run in ``events`` (one job's logs, every node's); None if there is nothing to show."""
    events = sorted((e for e in events if isinstance(e.get("t"), (int, float))), key=lambda e: e["t"])
    sup = [e for e in events if e.get("src") == "supervisor"]
    nodes = launches(sup)
    boundaries: dict[str, list[float]] = defaultdict(list)
    for e in sup:
        if e["ev"] in (Ev.ATTEMPT_END, Ev.GROUP_END, Ev.LAUNCH_END):
            boundaries[_str(e, "node")].append(e["t"])
    regroups = [e["t"] for e in sup if e["ev"] == Ev.GROUP_END]
    lives = rank0_lives(events, boundaries, regroups)
    if not nodes and not lives:
        return None
    workers = node_workers(events, boundaries, lives)
    for w in workers:  # a node killed whole left no supervisor event after its start: its workers tell more
        if w.node in nodes:
            nodes[w.node].end = max(nodes[w.node].end, w.end)
    newest = max((s for life in lives for _, s in life.commits), default=None)
    kept = kept_steps(lives, newest)
    stop_causes(lives, sup, nodes)
    starts = [n.start for n in nodes.values()] + [life.proc_start for life in lives]
    ends = [n.end for n in nodes.values()] + [life.end for life in lives] + [life.last for life in lives]
    start = min(starts)
    end = max(start, *ends)  # (a process start stamped after its own events: a skewed or crafted log)
    work = {id(life): _work_intervals(life, keep) for life, keep in zip(lives, kept, strict=True)}
    mine, shared = _node_intervals(sup, events, nodes, workers, work)
    intervals = [(n.start, n.end, "other") for n in nodes.values()]
    if not nodes:  # not run under ftrain launch: the workers' own lives are what ran
        intervals += [(life.proc_start, life.end, "other") for life in lives]
    for life in lives:
        intervals += [(life.proc_start, _begun(life), "startup"), *work[id(life)]]
    for per_node in mine.values():
        intervals += per_node
    job = paint(intervals, start, end, fill="down")
    painted = {name: paint(mine[name] + shared[name], n.start, n.end) for name, n in nodes.items()}
    lanes = _lanes(sup, nodes, painted, lives, job, events)
    recoveries = []
    for prev, nxt in pairwise(lives):
        gap = _sum(_clip(job, prev.end, nxt.work_start))
        recoveries.append(sum(v for k, v in gap.items() if k not in ("down", "productive", "lost")))
    scheduled = [[s for s in life.saves if life.stopped is None or s[0] < life.stopped - 1e-9] for life in lives]
    gaps = [b[0] - (a[0] + a[1]) for saves in scheduled for a, b in pairwise(saves)]
    changes = [e["t"] for e in sup if e["ev"] == Ev.GROUP_END and e.get("ending") == "membership change"]
    counts = {"attempts": len(lives), "unplanned": sum(1 for life in lives[:-1] if life.stopped is None
                                                      and life.finished is None),
              "preemptions": sum(1 for life in lives if life.preemption),
              "membership": sum(1 for life in lives if _membership(life, changes)),
              "saves": sum(len(life.saves) for life in lives), "commits": sum(len(life.commits) for life in lives),
              "restores": sum(1 for life in lives if life.found)}
    if lives and lives[-1].stopped is None and lives[-1].finished is None:
        counts["unplanned"] += 1  # the last one too ended without saving its work
    return Timeline(start, end, job, lanes, _sum(job), counts,
                    [blocking for life in lives for _, blocking, _ in life.saves], recoveries,
                    sum(gaps) / len(gaps) if gaps else None)


def _membership(life: Life, changes: list[float]) -> bool:
    """Whether ``life`` ended at a membership change: stopped by torchrun to admit a node, or its group ended
    because a peer was lost (a supervisor's ``group_end`` says so when it ended)."""
    if life.stopped is not None:
        return not life.preemption
    return life.finished is None and any(life.last <= t <= life.end + 1e-6 for t in changes)


def _begun(life: Life) -> float:
    """When its startup ended: the restore began (its first event, if it recorded no restore)."""
    return life.restore_start if life.restore_start is not None else life.first


def _work_intervals(life: Life, keep: int) -> list[Interval]:
    """The job's work in one rank-0 incarnation (restore, productive, lost, saves): the same on every rank."""
    out: list[Interval] = []
    if life.restore_start is not None and life.restore_end is not None:
        out.append((life.restore_start, life.restore_end, "restore"))
    split = min(max(life.time_of(keep), life.work_start), life.end)
    out.append((life.work_start, split, "productive"))
    final = life.stopped is not None and any(s == keep for _, _, s in life.saves)
    # After the final save's snapshot, a stopped incarnation only commits (and uploads) it: save time.
    out.append((split, life.end, "save" if final else "lost"))
    out += [(s, s + blocking, "save") for s, blocking, _ in life.saves]
    return out


def _node_intervals(sup: list[dict[str, Any]], events: Sequence[dict[str, Any]], nodes: dict[str, Node],
                    workers: list[Workers], work: dict[int, list[Interval]]
                    ) -> tuple[dict[str, list[Interval]], dict[str, list[Interval]]]:
    """Each node's intervals: its own (its supervisor's, its workers' startup), and its share of the job's work
    (rank 0's intervals while its workers took part in it; the job lane has them once, from rank 0)."""
    own = _supervisor_intervals(sup, events, nodes)
    shared: dict[str, list[Interval]] = {name: [] for name in nodes}
    for w in workers:
        if w.node not in nodes:
            continue
        begun = _begun(w.life) if w.life is not None else w.first
        own[w.node].append((w.start, min(max(begun, w.start), w.end), "startup"))
        if w.life is not None:
            shared[w.node] += [(max(a, w.start), min(b, w.end), bucket) for a, b, bucket in work[id(w.life)]
                               if b > w.start and a < w.end]
            if w.life.stopped is not None and not w.life.preemption:
                # torchrun stopped the workers to admit a node: the re-rendezvous began then, not when the
                # supervisor saw the last worker gone.
                own[w.node].append((w.life.stopped, w.end, "rendezvous"))
    return own, shared


def _supervisor_intervals(sup: list[dict[str, Any]], events: Sequence[dict[str, Any]],
                          nodes: dict[str, Node]) -> dict[str, list[Interval]]:
    out: dict[str, list[Interval]] = {name: [] for name in nodes}
    starts: dict[str, list[float]] = defaultdict(list)  # when each node's workers started (local rank 0)
    for e in events:
        if e.get("src") == "worker" and e["ev"] == Ev.SESSION_START and _int(e, "local_rank") == 0:
            starts[_str(e, "node")].append(or_(_num(e, "proc_start"), e["t"]))
    for node in starts:
        starts[node].sort()
    first_attempt: dict[str, float] = {}
    for i, e in enumerate(sup):
        node, t, ev = _str(e, "node"), e["t"], e["ev"]
        mine = out[node]
        if ev in (Ev.ATTEMPT_START, Ev.GROUP_END):
            # torchrun starting (or re-rendezvousing) until this node's next workers start, if they start
            # before the node's next boundary; an attempt whose workers never started waited all along.
            if ev == Ev.ATTEMPT_START:
                first_attempt.setdefault(node, t)
            later = starts.get(node, [])
            j = bisect.bisect_right(later, t)
            until = later[j] if j < len(later) else None
            nxt = next((x["t"] for x in sup[i + 1:] if _str(x, "node") == node
                        and x["ev"] in (Ev.ATTEMPT_START, Ev.ATTEMPT_END, Ev.LAUNCH_END, Ev.GROUP_END)), None)
            if until is not None and (nxt is None or until <= nxt):
                mine.append((t, until, "rendezvous"))
            elif ev == Ev.ATTEMPT_START and nxt is not None:
                mine.append((t, nxt, "rendezvous"))
        elif ev == Ev.BACKOFF and (delay := _num(e, "delay")) is not None:
            mine.append((t, t + max(0.0, delay), "backoff"))
        elif ev == Ev.HANG:
            since = _num(e, "since")
            end = next((x["t"] for x in sup[i + 1:] if _str(x, "node") == node
                        and x["ev"] in (Ev.ATTEMPT_END, Ev.GROUP_END, Ev.LAUNCH_END)), t)
            since = since if since is not None and since <= t else t
            # Hung inside a save: the save stalled, and a stalled save is save time (it wins over hang).
            mine.append((since, end, "save" if _str(e, "phase") == "saving" else "hang"))
        if ev in (Ev.ATTEMPT_END, Ev.GROUP_END) and (saving := _num(e, "saving")) is not None and saving <= t:
            # A rank was still in a save when its workers ended: from that save's start, the save stalled
            # (or was cut short), whatever ended it.
            mine.append((saving, t, "save"))
    for node, n in nodes.items():
        if node in first_attempt:
            out[node].append((n.start, first_attempt[node], "startup"))  # the launcher's own start
    return out


def _lanes(sup: list[dict[str, Any]], nodes: dict[str, Node], painted: dict[str, list[Segment]],
           lives: list[Life], job: list[Segment], events: Sequence[dict[str, Any]]) -> list[Lane]:
    """A lane per node of a multi-node launch (``<host> launch <n>``), else per attempt (``<host> attempt <a>``,
    ``<host> launch <n> attempt <a>`` where the host launched more than once); each painted with its node's
    own timeline."""
    lanes: list[Lane] = []
    order = sorted(nodes.values(), key=lambda n: (n.start, n.node))
    per_host: dict[str, int] = defaultdict(int)
    for n in order:
        per_host[n.host] += 1
        n.label = f"{n.host} launch {per_host[n.host]}"
    regroups = [(e["t"], _str(e, "node")) for e in sup if e["ev"] == Ev.GROUP_START]
    for n in order:
        segments = painted[n.node]
        if n.multi:
            marks = _marks(events, n.node, n.start, n.end)
            # Killed whole (no launch_end), and the others went on without it: say so where it ended.
            if not n.ended and any(t > n.end and node != n.node for t, node in regroups):
                marks.append(Mark(n.end, "failure", "node lost"))
            lanes.append(Lane(n.label, n.node, n.start, n.end, segments, marks))
            continue
        mine = [e for e in sup if _str(e, "node") == n.node]
        edges = [n.start, *[e["t"] for e in mine if e["ev"] == Ev.ATTEMPT_START and n.start < e["t"] < n.end], n.end]
        if len(edges) > 2:
            edges = [n.start, *edges[2:]]  # the launcher's startup belongs to the first attempt
        who = n.label if per_host[n.host] > 1 else n.host
        for k, (x, y) in enumerate(pairwise(edges)):
            lanes.append(Lane(f"{who} attempt {_attempt_number(mine, x, k)}", n.node, x, y, _clip(segments, x, y),
                              _marks(events, n.node, x, y)))
    if not nodes:  # plain torchrun: one lane per incarnation
        for k, life in enumerate(lives):
            lanes.append(Lane(f"attempt {k}", life.node, life.proc_start, life.end,
                              _clip(job, life.proc_start, life.end), _marks(events, life.node, life.proc_start,
                                                                            life.end)))
    return lanes


def _attempt_number(events: list[dict[str, Any]], start: float, default: int) -> int:
    for e in events:
        if e["ev"] == Ev.ATTEMPT_START and e["t"] >= start - 1e-6:
            return a if (a := _int(e, "attempt")) is not None else default
    return default


def _marks(events: Sequence[dict[str, Any]], node: str, a: float, b: float) -> list[Mark]:
    """The marks of one lane: ``events`` are sorted by time, so only its span is looked at."""
    out = []
    lo = bisect.bisect_left(events, a, key=lambda e: e["t"])
    hi = bisect.bisect_right(events, b, key=lambda e: e["t"])
    for e in events[lo:hi]:
        if _str(e, "node") != node:
            continue
        t, ev = e["t"], e["ev"]
        if ev == Ev.COMMITTED:
            out.append(Mark(t, "commit", f"step {_int(e, 'step')}"))
        elif ev == Ev.FAILURE:
            out.append(Mark(t, "failure", _str(e, "detail")[:120]))
        elif ev == Ev.GROUP_END and e.get("ending") == "membership change":
            out.append(Mark(t, "resize", "membership change"))
        elif ev == Ev.HANG:
            out.append(Mark(t, "hang", _str(e, "verdict")[:120]))
        elif ev in (Ev.SIGNAL, Ev.NOTICE):
            out.append(Mark(t, "preemption", _str(e, "name") or f"{_str(e, 'source')} notice"))
        elif ev == Ev.RESTORE and e.get("found"):
            out.append(Mark(t, "restore", f"restored step {_int(e, 'step')}"))
    return out
