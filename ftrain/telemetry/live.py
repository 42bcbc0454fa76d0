"""The state of a run now, from its event log and its ranks' heartbeats (``ftrain status``, the progress line).

:func:`status_of` is pure: events (docs/FORMAT.md, "Event log") and heartbeats in,
a :class:`Status` out, so it is tested on synthetic logs. :func:`read_status`
gathers the inputs from one or several checkpoint directories (node-local disks:
one per node), so that a multi-node job is one status: every node's launch
(:class:`NodeState`), and the heartbeats of every running node's ranks.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrain.attempt import AttemptFiles, Heartbeat
from ftrain.errors import printable
from ftrain.events import Ev, read_events, text
from ftrain.events import integer as _int
from ftrain.events import number as _num
from ftrain.telemetry.incarnations import multi_node

#: Seconds of progress events the step rate is measured over.
RATE_WINDOW = 60.0
#: A node of a multi-node launch is lost when another node started a worker group this much later than the
#: node's last event: live nodes join every group together (one rendezvous), within a second or so.
LOST_AFTER = 3.0


@dataclass
class RankState:
    node: str  # the node's label (``<host> launch <n>``), or its attempt directory
    rank: int
    phase: str
    step: int
    age: float


@dataclass
class NodeState:
    """One ``ftrain launch`` of the run (a node): ``<host> launch <n>``, the host's n-th launch of the run."""

    label: str
    node: str  # ``<host>/<pid of ftrain launch>``, as in the event log
    #: running, exited N (its launch_end), lost (killed whole: the other nodes went on without it)
    state: str
    attempt_dir: str | None = None
    group: int | None = None  # its current worker group (multi-node)
    age: float | None = None  # since it started
    last_event_age: float | None = None


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
    #: Every launch of the run's current job, oldest first (one per node of a multi-node job).
    nodes: list[NodeState] = field(default_factory=list)
    #: Seconds the oldest save in progress has lasted (from the heartbeats), if one is.
    saving_for: float | None = None


def _str(e: dict[str, Any], key: str) -> str:
    return printable(text(e, key))  # everything shown comes from an untrusted file


def newest_run(events: Sequence[dict[str, Any]]) -> str | None:
    return _str(events[-1], "run") or None if events else None


#: Heartbeats per node (``<host>/<pid of ftrain launch>``, the event log's ``node``), by rank.
Beats = dict[str, dict[int, Heartbeat]]
#: Reads the running nodes' heartbeats: {node: (its newest attempt directory as recorded, the checkpoint directory
#: it recorded: its ``launch`` event's ``ckpt_dir``, "" if none)} in, heartbeats per node out.
BeatReader = Callable[[dict[str, tuple[str, str]]], Beats]


@dataclass
class _Launch:
    node: str
    host: str
    start: float
    t: float  # its launch event, or its first event
    last: float
    multi: bool = False
    ckpt_dir: str = ""
    end: dict[str, Any] | None = None  # its launch_end
    dir: str | None = None  # its newest attempt directory
    group: int | None = None
    group_start: float | None = None
    label: str = ""
    lost: bool = False


def _launches(mine: Sequence[dict[str, Any]]) -> list[_Launch]:
    """Every launch of the run, oldest first, labelled ``<host> launch <n>`` (as ``ftrain goodput``'s lanes)."""
    out: dict[str, _Launch] = {}
    for e in mine:
        node, t, ev = _str(e, "node"), e["t"], e["ev"]
        sup = e.get("src") == "supervisor"
        if node not in out:
            if not sup:
                continue  # workers outside any launch (plain torchrun): no node to show
            out[node] = _Launch(node, _str(e, "host") or node.rsplit("/", 1)[0], t, t, t)
        n = out[node]
        n.last = max(n.last, t)
        if not sup:
            continue
        if ev == Ev.LAUNCH:
            started = _num(e, "proc_start")
            n.t, n.start = t, min(t, started) if started is not None else t
            n.ckpt_dir = text(e, "ckpt_dir")
            n.multi = n.multi or multi_node(e.get("nnodes"))
        elif ev == Ev.ATTEMPT_START and text(e, "dir"):
            n.dir = text(e, "dir")
        elif ev == Ev.GROUP_START:
            n.group, n.group_start = _int(e, "group"), t
        elif ev == Ev.LAUNCH_END:
            n.end = e
    launches = sorted(out.values(), key=lambda n: (n.start, n.node))
    per_host: dict[str, int] = {}
    for n in launches:
        per_host[n.host] = per_host.get(n.host, 0) + 1
        n.label = f"{n.host} launch {per_host[n.host]}"
    regroups = [(e["t"], _str(e, "node")) for e in mine if e["ev"] == Ev.GROUP_START and e.get("src") == "supervisor"]
    for n in launches:
        # Killed whole, it records nothing more: the others' next worker group started without it.
        n.lost = n.end is None and n.multi and any(t > n.last + LOST_AFTER and node != n.node
                                                   for t, node in regroups)
    return launches


def _current(launches: list[_Launch]) -> list[_Launch]:
    """The launches of the job running now (or last): those that overlapped, back from the newest launch. A launch
    runs from its start to its launch_end, or to its last event if lost or single-node and superseded."""
    if not launches:
        return []
    newest = max(launches, key=lambda n: n.t)

    def until(n: _Launch) -> float:
        if n.end is not None:
            return float(n.end["t"])
        return n.last if n.lost or (not n.multi and n is not newest) else math.inf

    group = [newest]
    begin = newest.start
    for n in sorted((n for n in launches if n is not newest), key=lambda n: -until(n)):
        if until(n) >= begin - 1e-6:
            group.append(n)
            begin = min(begin, n.start)
    return sorted(group, key=lambda n: (n.start, n.node))


def status_of(events: Sequence[dict[str, Any]], beats: Beats | BeatReader, now: float,
              run: str | None = None) -> Status:
    """The state of ``run`` (default: the newest) at wall time ``now``; ``beats``: heartbeats per node, or what
    reads them given the running nodes' newest attempt directories (:data:`BeatReader`)."""
    run = run or newest_run(events)
    mine = [e for e in events if _str(e, "run") == (run or "")]
    st = Status(run=run)
    if not mine:
        return st
    st.last_event_age = now - mine[-1]["t"]
    launches = _launches(mine)
    current = _current(launches)
    running = [n for n in current if n.end is None and not n.lost]
    st.nodes = [NodeState(n.label, n.node, _node_state(n), n.dir, n.group, now - n.start, now - n.last)
                for n in current]
    sup = [e for e in mine if e.get("src") == "supervisor"]
    launch = next((e for e in reversed(sup) if e["ev"] == Ev.LAUNCH), None)
    since = min((n.t for n in current), default=mine[0]["t"])
    if launch is not None:
        st.budget = _int(launch, "max_restarts")
    now_events = [e for e in mine if e["t"] >= since]
    attempt_start = None
    for e in now_events:
        ev = e["ev"]
        if ev == Ev.ATTEMPT_START:
            attempt_start = e
            st.attempt = _int(e, "attempt")
            st.attempt_age = now - e["t"]
        elif ev == Ev.ATTEMPT_END and _str(e, "outcome") in ("failed", "hung"):
            st.restarts += 1
            st.recent.append(f"attempt {_int(e, 'attempt')} {_str(e, 'outcome')}: {_str(e, 'detail')}")
        elif ev == Ev.GROUP_END:
            if e.get("counted"):
                st.restarts += 1
            st.recent.append(f"worker group {_int(e, 'group')} {_str(e, 'ending')}: {_str(e, 'detail')}")
        elif ev in (Ev.SIGNAL, Ev.NOTICE):
            st.recent.append(f"stop requested: {_str(e, 'name') or _str(e, 'source') + ' notice'}")
    st.recent += [f"{n.label} lost: no event since {_age(now - n.last)} ago, the other nodes went on without it"
                  for n in current if n.lost]
    for e in mine:  # checkpoints and the plan carry over from earlier launches of the run
        if e["ev"] == Ev.COMMITTED and (step := _int(e, "step")) is not None:
            if st.newest_step is None or step >= st.newest_step:
                st.newest_step, st.newest_age = step, now - e["t"]
        elif e["ev"] == Ev.SESSION_START and (total := _int(e, "total_steps")) is not None:
            st.total_steps = total
        if e["ev"] == Ev.SESSION_START and (w := _int(e, "world")) is not None:
            st.world = w
    ended = [n.end for n in current if n.end is not None]
    if not running and ended:  # every node of the job exited (or was lost): the newest exit says how
        code = _int(max(ended, key=lambda e: e["t"]), "exit_code")
        st.state = "finished" if code == 0 else "preempted" if code == 75 else "failed"
    else:
        st.state = _state(now_events, attempt_start)
    if attempt_start is not None:
        st.attempt_dirs = sorted({n.dir for n in running if n.dir} or {
            _str(e, "dir") for e in now_events if e["ev"] == Ev.ATTEMPT_START
            and e["t"] >= attempt_start["t"] - 1.0 and _str(e, "dir")})
    begun = attempt_start["t"] if attempt_start is not None else since
    # (when, step completed): a save's step was complete when its snapshot started
    progress = [(_num(e, "start") or e["t"] if e["ev"] == Ev.SAVE else e["t"], s) for e in now_events
                if e["ev"] in (Ev.PROGRESS, Ev.FIRST_STEP, Ev.SAVE) and e.get("src") == "worker" and e["t"] >= begun
                and (s := _int(e, "step")) is not None]
    if progress:
        st.step = progress[-1][1]
        window = [p for p in progress if p[0] >= progress[-1][0] - RATE_WINDOW]
        if len(window) >= 2 and window[-1][0] > window[0][0] and window[-1][1] >= window[0][1]:
            st.steps_per_s = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
    by_node = {n.node: n for n in current}
    if callable(beats):
        # Nodes on one host with node-local disks may record the same attempt directory (each on its own disk):
        # heartbeats are the node's, not the path's.
        wanted = {n.node: (n.dir, n.ckpt_dir) for n in running if n.dir}
        if not wanted and attempt_start is not None:  # none running: the last attempt's, as it left them
            node = _str(attempt_start, "node")
            wanted = {node: (text(attempt_start, "dir"), by_node[node].ckpt_dir if node in by_node else "")}
        beats = beats(wanted)
    for node, node_beats in sorted(beats.items(), key=lambda kv: (by_node[kv[0]].label if kv[0] in by_node
                                                                  else kv[0])):
        n = by_node.get(node)
        for rank, b in sorted(node_beats.items()):
            # Rank files stay behind when a worker group has fewer ranks than an earlier one: only the current
            # group's count (they wrote after it started).
            if n is not None and n.group_start is not None and b.time < n.group_start - 1.0:
                continue
            st.ranks.append(RankState(n.label if n is not None else printable(node), rank, b.phase, b.step,
                                      max(0.0, now - b.time)))
    live = [r.step for r in st.ranks if r.phase == "step"]
    if live and st.state in ("running", "saving") and (st.step is None or min(live) > st.step):
        st.step = min(live)  # heartbeats are fresher than the last progress event
    saving = [r.age for r in st.ranks if r.phase == "saving"]
    if saving and st.state in ("running", "restoring", "starting"):
        st.state, st.saving_for = "saving", max(saving)
    if st.total_steps is not None and st.step is not None and st.steps_per_s and st.state not in (
            "finished", "failed"):
        st.eta = max(0, st.total_steps - st.step) / st.steps_per_s
    st.recent = st.recent[-4:]
    return st


def _node_state(n: _Launch) -> str:
    if n.end is not None:
        code = _int(n.end, "exit_code")
        return f"exited {code if code is not None else '?'}"
    return "lost" if n.lost else "running"


def _state(events: Sequence[dict[str, Any]], attempt_start: dict[str, Any] | None) -> str:
    last_sup = next((e for e in reversed(events) if e.get("src") == "supervisor"), None)
    if last_sup is not None and last_sup["ev"] == Ev.LAUNCH_END:
        code = _int(last_sup, "exit_code")
        return "finished" if code == 0 else "preempted" if code == 75 else "failed"
    if last_sup is not None and last_sup["ev"] == Ev.BACKOFF:
        return "backoff"
    after = [e for e in events if attempt_start is None or e["t"] >= attempt_start["t"]]
    if any(e["ev"] in (Ev.SIGNAL, Ev.NOTICE) for e in after):
        return "stopping"
    work = [e for e in after if e.get("src") == "worker"]
    if not work:
        return "starting"
    kinds = {e["ev"] for e in work}
    if Ev.FIRST_STEP in kinds or Ev.PROGRESS in kinds:
        return "running"
    return "restoring" if Ev.SESSION_START in kinds else "starting"


def attempt_dir_under(recorded: str, ckpt_dir: str, roots: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Where a node's attempt directory may be here: as recorded, or, recorded under the node's checkpoint
    directory, at the same place under each root given (a node-local disk read through another mount)."""
    out = [Path(recorded)]
    if ckpt_dir:
        try:
            rel = Path(recorded).relative_to(ckpt_dir)
        except ValueError:
            return out
        out += [Path(root) / rel for root in roots]
    return out


def read_status(*roots: str | os.PathLike[str], run: str | None = None, now: float | None = None) -> Status:
    """Gather the event logs and the running nodes' heartbeats under checkpoint directories ``roots``."""
    homes: dict[str, list[str]] = {}
    events = read_events(*roots, homes=homes)

    def heartbeats(wanted: dict[str, tuple[str, str]]) -> Beats:
        out: Beats = {}
        for node, (recorded, ckpt_dir) in wanted.items():
            # First under the directory that holds the node's own log: on node-local disks the recorded path is
            # the node's disk, and here it may be another node's or nothing.
            places = attempt_dir_under(recorded, ckpt_dir, homes.get(node, []) or roots)
            here = next((p for p in [*places[1:], places[0]] if p.is_dir()), None)
            if here is not None:
                out[node] = AttemptFiles(here).read_heartbeats()
        return out

    return status_of(events, heartbeats, time.time() if now is None else now, run)


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


def format_status(st: Status, roots: str | Sequence[str]) -> str:
    """A screenful: the run, its attempt, step and speed, checkpoints, its nodes, each rank's heartbeat, recent
    trouble."""
    where = printable(roots if isinstance(roots, str) else ", ".join(roots))
    if st.run is None:
        return f"no event log under {where} (events/: not run with this version of ftrain, or not started)"
    lines = [f"run {st.run} in {where}",
             f"  state      {st.state}" + (f" for {_age(st.saving_for)}" if st.saving_for is not None else "")
             + (f" (last event {_age(st.last_event_age)} ago)" if st.last_event_age is not None else ""),
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
    if len(st.nodes) > 1:
        lines.append("  nodes (state, started, last event)")
        for n in st.nodes[:32]:
            group = f", worker group {n.group}" if n.group is not None and n.state == "running" else ""
            lines.append(f"    {n.label}: {n.state}{group}, {_age(n.age)} ago, {_age(n.last_event_age)} ago")
    if st.ranks:
        lines.append("  heartbeats (rank: phase step, age)")
        many = len({r.node for r in st.ranks}) > 1
        for r in st.ranks[:32]:
            at = f" [{r.node}]" if many else ""
            lines.append(f"    rank {r.rank}{at}: {printable(r.phase)} {r.step}, {_age(r.age)} ago")
        if len(st.ranks) > 32:
            lines.append(f"    ... and {len(st.ranks) - 32} more")
    if st.recent:
        lines.append("  recent")
        lines.extend(f"    {line}" for line in st.recent)
    return "\n".join(lines)
