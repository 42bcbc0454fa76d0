"""``ftrain goodput DIR [DIR ...]`` (where a run's wall time went, the timeline picture, the interval advice) and
``ftrain status DIR [DIR ...]`` (the run now, ``--watch`` to follow it). Both read only the event logs and
heartbeats: no torch import, so they answer in a fraction of a second.

Several directories make one job-wide view: with node-local disks each node's log is on its own disk, so give
every node's checkpoint directory (mounted or copied here); one shared directory is read once however often it
is given (docs/FORMAT.md, "Event log")."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ftrain.errors import UsageError, printable

#: What each bucket means, as printed beside it (docs/goodput.md).
MEANING = {
    "productive": "steps whose work counts",
    "startup": "processes starting: imports, process group, model, until the restore",
    "rendezvous": "torchrun starting, rendezvous, waiting for nodes",
    "restore": "reading and verifying checkpoints",
    "save": "training blocked by saves",
    "lost": "steps done again after failures",
    "hang": "hung until the hang detector killed it",
    "backoff": "restart policy delay",
    "other": "failure detection, teardown, exits",
    "down": "between launches: nothing running",
}


def add_parser(sub: Any) -> None:
    g = sub.add_parser("goodput", help="where a run's wall time went: goodput and badput buckets, a timeline "
                                       "picture, and the checkpoint interval to use",
                       description="Goodput (productive step time over wall time) of every run in the checkpoint "
                                   "directories, from their event logs: one job-wide view over every node's log "
                                   "(node-local disks: give each node's directory).")
    g.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directory (checkpoint.dir); several: one "
                                                          "per node-local disk, merged")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--plot", metavar="FILE.png", help="write the timeline picture (needs ftrain[plot])")
    g.add_argument("--mtbf", type=float, metavar="SECONDS",
                   help="mean time between failures to plan for (default: observed in this run)")
    g.set_defaults(func=cmd_goodput)
    s = sub.add_parser("status", help="a run's state now: attempt, step, speed, checkpoints, heartbeats",
                       description="The state of the newest run in the checkpoint directories, from their event "
                                   "logs and the ranks' heartbeats of every node (node-local disks: give each "
                                   "node's directory).")
    s.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directory (checkpoint.dir); several: one "
                                                          "per node-local disk, merged")
    s.add_argument("--run", help="run id (default: the newest)")
    s.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until interrupted")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_status)


def _roots(paths: list[str]) -> list[str]:
    for path in paths:
        if not os.path.isdir(path):
            raise UsageError(f"checkpoint dir {path!r} does not exist or is not a directory")
    return paths


def cmd_goodput(args: argparse.Namespace) -> int:
    from ftrain.events import events_dir, read_events
    from ftrain.telemetry.advisor import advise, describe
    from ftrain.telemetry.timeline import build, duration

    roots = _roots(args.dirs)
    if args.mtbf is not None and not args.mtbf > 0:
        raise UsageError(f"--mtbf must be a positive number of seconds, got {args.mtbf}")
    tl = build(read_events(*roots))
    if tl is None:
        where = ", ".join(str(events_dir(root)) for root in roots)
        raise UsageError(f"no events under {where}: the run was not made with this version of ftrain, "
                         "or has not started; see `ftrain status`")
    advice = advise(tl, args.mtbf)
    size = None
    if args.plot:
        from ftrain.telemetry.plot import render

        size = render(tl, args.plot)
    if args.json:
        out: dict[str, Any] = {
            "start": tl.start, "end": tl.end, "wall_seconds": tl.wall, "goodput": tl.goodput,
            "running_goodput": tl.running_goodput, "buckets": tl.buckets, "counts": tl.counts,
            "save_interval": tl.save_interval, "recoveries": tl.recoveries,
            "lanes": [{"label": lane.label, "node": lane.node, "start": lane.start, "end": lane.end,
                       "buckets": lane.buckets} for lane in tl.lanes],
            "advisor": advice if isinstance(advice, str) else advice.__dict__}
        if size is not None:
            out["plot"] = {"path": args.plot, "width": size[0], "height": size[1]}
        print(json.dumps(out, indent=1, default=str))
        return 0
    changes = f", {tl.counts['membership']} membership change(s)" if tl.counts["membership"] else ""
    print(f"wall time {duration(tl.wall)}, {tl.counts['attempts']} attempt(s), {tl.counts['unplanned']} failure(s) "
          f"that lost work, {tl.counts['preemptions']} preemption(s){changes}, {tl.counts['commits']} checkpoint(s)")
    print(f"goodput {tl.goodput:.1%}" + (f" ({tl.running_goodput:.1%} of the time a launch ran)"
                                         if tl.buckets["down"] > 0 else ""))
    for name, seconds in tl.buckets.items():
        if seconds > 0 or name == "productive":
            print(f"  {name:<11} {duration(seconds):>9} {seconds / tl.wall if tl.wall else 0:>7.1%}  {MEANING[name]}")
    for line in describe(advice):
        print(line)
    if size is not None:
        print(f"timeline: {printable(args.plot)} ({size[0]}x{size[1]})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ftrain.telemetry.live import format_status, read_status

    roots = _roots(args.dirs)
    if args.watch is not None and not args.watch > 0:
        raise UsageError(f"--watch must be a positive number of seconds, got {args.watch}")
    while True:
        st = read_status(*roots, run=args.run)
        if args.json:
            text = json.dumps(st.__dict__, default=lambda o: o.__dict__, indent=1)
        else:
            text = format_status(st, roots)
        if args.watch is None:
            print(text)
            return 0 if st.run is not None else 1
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
        print(text + f"\n\n(every {args.watch:g}s; Ctrl-C to stop)", flush=True)
        if st.state in ("finished", "failed", "preempted") and not sys.stdout.isatty():
            return 0
        time.sleep(args.watch)
