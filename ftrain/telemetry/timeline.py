"""A run's history from its event log: every second of wall time in exactly one bucket (pure).

Goodput is productive step time over wall time, after Google's ML Goodput
Measurement; the badput buckets (README, "Goodput") are:

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

How: each event is turned into labelled intervals (:func:`_intervals`), and the
wall time is painted with them, the most specific label winning where they
overlap (:data:`PRIORITY`), and ``down``/``other`` where none applies
(:func:`paint`); the buckets are the painted lengths, so they sum to the wall
time by construction. The step a later attempt restored decides, for each
attempt, where its productive time ends and its lost time begins.

Input is untrusted (docs/FORMAT.md, "Event log"): fields of the wrong type are ignored.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ftrain.events import integer as _int
from ftrain.events import number as _num
from ftrain.events import text as _str

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
    """One attempt (one worker group on a multi-node launch) of one node."""

    label: str
    node: str
    start: float
    end: float
    segments: list[Segment] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)


@dataclass
class Timeline:
    start: float
    end: float
    job: list[Segment]
    lanes: list[Lane]
    buckets: dict[str, float]
    #: attempts (worker incarnations), unplanned (ended with work lost), preemptions, saves, commits, restores
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
def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def duration(seconds: float) -> str:
    """A length of time for people: ``27.3s``, ``4m05s``, ``1h02m03s``."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m // 60}h{m % 60:02d}m{sec:02d}s" if m >= 60 else f"{m}m{sec:02d}s"


@dataclass
class _Life:
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
    preempted: float | None = None
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


def _lives(events: Sequence[dict[str, Any]], boundaries: dict[str, list[float]]) -> list[_Life]:
    """Rank 0's incarnations, oldest first; each ends at the first supervisor boundary of its node after it."""
    lives: dict[tuple[str, int | None], _Life] = {}
    for e in events:
        if e.get("src") != "worker" or _int(e, "rank") != 0:
            continue
        key = (_str(e, "node"), _int(e, "pid"))
        t, ev = e["t"], e["ev"]
        life = lives.get(key)
        if life is None:
            start = _num(e, "proc_start") if ev == "session_start" else None
            life = lives[key] = _Life(key[0], key[1], _int(e, "attempt"), min(_or(start, t), t), t, t)
        life.last = max(life.last, t)
        step = _int(e, "step")
        if ev == "restore" and step is not None:
            start = _num(e, "start")
            seconds = _num(e, "seconds")
            life.restore_start = start if start is not None else t
            life.restore_end = life.restore_start + seconds if seconds is not None else t
            life.restored, life.found = step, bool(e.get("found"))
        elif ev in ("first_step", "progress") and step is not None:
            life.points.append((t, step))
        elif ev == "save" and step is not None:
            start = _num(e, "start")
            blocking = _num(e, "blocking")
            if start is not None and blocking is not None and blocking >= 0:
                life.saves.append((start, blocking, step))
                life.points.append((start, step))
        elif ev == "committed" and step is not None:
            life.commits.append((t, step))
        elif ev == "preempted":
            life.preempted = t
        elif ev == "finished":
            life.finished = (t, step)
    out = sorted(lives.values(), key=lambda x: x.first)
    for life in out:
        if life.finished is not None:
            life.end = life.finished[0]
        elif life.preempted is not None:
            life.end = life.preempted
        else:
            later = boundaries.get(life.node, [])
            i = bisect.bisect_left(later, life.last)
            life.end = later[i] if i < len(later) else life.last
    return out


def _kept(lives: list[_Life], newest_commit: int | None) -> list[int]:
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
def build(events: Sequence[dict[str, Any]]) -> Timeline | None:
    """The timeline of every run in ``events`` (one checkpoint directory's); None if there is nothing to show."""
    events = sorted((e for e in events if isinstance(e.get("t"), (int, float))), key=lambda e: e["t"])
    sup = [e for e in events if e.get("src") == "supervisor"]
    # Launches: [process start, end] per supervisor node; a node that left no launch_end ends at its last event.
    spans: dict[str, list[float]] = {}
    for e in sup:
        node = _str(e, "node")
        span = spans.setdefault(node, [e["t"], e["t"]])
        if e["ev"] == "launch":
            span[0] = min(span[0], _or(_num(e, "proc_start"), e["t"]))
        span[1] = max(span[1], e["t"])
    boundaries: dict[str, list[float]] = defaultdict(list)
    for e in sup:
        if e["ev"] in ("attempt_end", "group_end", "launch_end"):
            boundaries[_str(e, "node")].append(e["t"])
    lives = _lives(events, boundaries)
    if not spans and not lives:
        return None
    newest = max((s for life in lives for _, s in life.commits), default=None)
    kept = _kept(lives, newest)
    starts = [a for a, _ in spans.values()] + [life.proc_start for life in lives]
    ends = [b for _, b in spans.values()] + [life.end for life in lives] + [life.last for life in lives]
    start = min(starts)
    end = max(start, *ends)  # (a process start stamped after its own events: a skewed or crafted log)
    intervals = [(a, b, "other") for a, b in spans.values()]
    if not spans:  # not run under ftrain launch: the workers' own lives are what ran
        intervals += [(life.proc_start, life.end, "other") for life in lives]
    intervals += _life_intervals(lives, kept)
    intervals += _supervisor_intervals(sup, events, spans)
    job = paint(intervals, start, end, fill="down")
    buckets = _sum(job)
    lanes = _lanes(sup, lives, job, spans, events)
    recoveries = []
    for prev, nxt in pairwise(lives):
        gap = _sum(_clip(job, prev.end, nxt.work_start))
        recoveries.append(sum(v for k, v in gap.items() if k not in ("down", "productive", "lost")))
    scheduled = [(life, [s for s in life.saves if life.preempted is None or s[0] < life.preempted - 1e-9])
                 for life in lives]
    gaps = [b[0] - (a[0] + a[1]) for _, saves in scheduled for a, b in pairwise(saves)]
    counts = {"attempts": len(lives), "unplanned": sum(1 for life in lives[:-1] if life.preempted is None
                                                      and life.finished is None),
              "preemptions": sum(1 for life in lives if life.preempted is not None),
              "saves": sum(len(life.saves) for life in lives), "commits": sum(len(life.commits) for life in lives),
              "restores": sum(1 for life in lives if life.found)}
    if lives and lives[-1].preempted is None and lives[-1].finished is None:
        counts["unplanned"] += 1  # the last one too ended without saving its work
    return Timeline(start, end, job, lanes, buckets, counts,
                    [blocking for life in lives for _, blocking, _ in life.saves], recoveries,
                    sum(gaps) / len(gaps) if gaps else None)


def _life_intervals(lives: list[_Life], kept: list[int]) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    for life, keep in zip(lives, kept, strict=True):
        begun = life.restore_start if life.restore_start is not None else life.first
        out.append((life.proc_start, begun, "startup"))
        if life.restore_start is not None and life.restore_end is not None:
            out.append((life.restore_start, life.restore_end, "restore"))
        split = min(max(life.time_of(keep), life.work_start), life.end)
        out.append((life.work_start, split, "productive"))
        final = life.preempted is not None and any(s == keep for _, _, s in life.saves)
        # After the final save's snapshot, a preempted attempt only commits (and uploads) it: save time.
        out.append((split, life.end, "save" if final else "lost"))
        out += [(s, s + blocking, "save") for s, blocking, _ in life.saves]
    return out


def _supervisor_intervals(sup: list[dict[str, Any]], events: Sequence[dict[str, Any]],
                          spans: dict[str, list[float]]) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    starts: dict[str, list[float]] = defaultdict(list)  # when each node's workers started (local rank 0)
    for e in events:
        if e.get("src") == "worker" and e["ev"] == "session_start" and _int(e, "local_rank") == 0:
            starts[_str(e, "node")].append(_or(_num(e, "proc_start"), e["t"]))
    for node in starts:
        starts[node].sort()
    first_attempt: dict[str, float] = {}
    for i, e in enumerate(sup):
        node, t, ev = _str(e, "node"), e["t"], e["ev"]
        if ev in ("attempt_start", "group_end"):
            # torchrun starting (or re-rendezvousing) until this node's next workers start, if they start
            # before the node's next boundary; an attempt whose workers never started waited all along.
            if ev == "attempt_start":
                first_attempt.setdefault(node, t)
            later = starts.get(node, [])
            j = bisect.bisect_right(later, t)
            until = later[j] if j < len(later) else None
            nxt = next((x["t"] for x in sup[i + 1:] if _str(x, "node") == node
                        and x["ev"] in ("attempt_start", "attempt_end", "launch_end", "group_end")), None)
            if until is not None and (nxt is None or until <= nxt):
                out.append((t, until, "rendezvous"))
            elif ev == "attempt_start" and nxt is not None:
                out.append((t, nxt, "rendezvous"))
        elif ev == "backoff" and (delay := _num(e, "delay")) is not None:
            out.append((t, t + max(0.0, delay), "backoff"))
        elif ev == "hang":
            since = _num(e, "since")
            end = next((x["t"] for x in sup[i + 1:] if _str(x, "node") == node
                        and x["ev"] in ("attempt_end", "group_end", "launch_end")), t)
            out.append((since if since is not None and since <= t else t, end, "hang"))
    for node, (a, _) in spans.items():
        if node in first_attempt:
            out.append((a, first_attempt[node], "startup"))  # the launcher's own start
    return out


def _lanes(sup: list[dict[str, Any]], lives: list[_Life], job: list[Segment], spans: dict[str, list[float]],
           events: Sequence[dict[str, Any]]) -> list[Lane]:
    hosts = {_str(e, "host") for e in sup if e["ev"] == "launch"}
    concurrent = _overlapping(list(spans.values()))
    lanes: list[Lane] = []
    launches = len(spans)
    for n, (node, (a, b)) in enumerate(sorted(spans.items(), key=lambda kv: kv[1][0])):
        mine = [e for e in sup if _str(e, "node") == node]
        host = next((_str(e, "host") for e in mine if _str(e, "host")), node)
        who = node if concurrent and len(hosts) <= 1 else host
        multi = any(e["ev"] == "group_end" or e["ev"] == "group_start" for e in mine)
        cuts = [e for e in mine if e["ev"] == ("group_end" if multi else "attempt_start")]
        edges = [a, *[e["t"] for e in cuts if a < e["t"] < b], b]
        if not multi and len(edges) > 2:
            edges = [a, *edges[2:]]  # the launcher's startup belongs to the first attempt
        for k, (x, y) in enumerate(pairwise(edges)):
            label = f"{who} group {k}" if multi else f"{who} attempt {_attempt_number(mine, x, k)}"
            if launches > 1 and not concurrent:
                label += f" (launch {n + 1})"
            lanes.append(Lane(label, node, x, y, _clip(job, x, y), _marks(events, node, x, y)))
    if not spans:  # plain torchrun: one lane per incarnation
        for k, life in enumerate(lives):
            lanes.append(Lane(f"attempt {k}", life.node, life.proc_start, life.end,
                              _clip(job, life.proc_start, life.end), _marks(events, life.node, life.proc_start,
                                                                            life.end)))
    return lanes


def _attempt_number(events: list[dict[str, Any]], start: float, default: int) -> int:
    for e in events:
        if e["ev"] == "attempt_start" and e["t"] >= start - 1e-6:
            return a if (a := _int(e, "attempt")) is not None else default
    return default


def _overlapping(spans: list[list[float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in pairwise(spans))


def _marks(events: Sequence[dict[str, Any]], node: str, a: float, b: float) -> list[Mark]:
    """The marks of one lane: ``events`` are sorted by time, so only its span is looked at."""
    out = []
    lo = bisect.bisect_left(events, a, key=lambda e: e["t"])
    hi = bisect.bisect_right(events, b, key=lambda e: e["t"])
    for e in events[lo:hi]:
        t = e["t"]
        ev, mine = e["ev"], _str(e, "node") == node
        if ev == "committed" and mine:
            out.append(Mark(t, "commit", f"step {_int(e, 'step')}"))
        elif ev == "failure" and mine:
            out.append(Mark(t, "failure", _str(e, "detail")[:120]))
        elif ev == "group_end" and mine and e.get("ending") == "membership change":
            out.append(Mark(t, "resize", "membership change"))
        elif ev == "hang" and mine:
            out.append(Mark(t, "hang", _str(e, "verdict")[:120]))
        elif ev in ("signal", "notice") and mine:
            out.append(Mark(t, "preemption", _str(e, "name") or f"{_str(e, 'source')} notice"))
        elif ev == "restore" and mine and e.get("found"):
            out.append(Mark(t, "restore", f"restored step {_int(e, 'step')}"))
    return out
