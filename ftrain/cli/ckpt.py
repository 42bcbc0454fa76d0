"""``ftrain ckpt ls|verify``: inspect a checkpoint root without loading any state.

Neither command unpickles anything or writes to the directory.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.errors import UsageError

if TYPE_CHECKING:  # the store imports torch (seconds); `ftrain launch` must not pay that before its handlers
    from ftrain.checkpoint.store import CheckpointInfo, CheckpointStore


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ckpt", help="list and verify checkpoints")
    cs = p.add_subparsers(dest="ckpt_command", required=True, parser_class=type(p))
    ls = cs.add_parser("ls", help="table of checkpoints: step, time, size, status")
    ls.add_argument("dir", help="checkpoint root directory")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_ls)
    v = cs.add_parser("verify", help="check sizes and checksums; exit 1 if anything checked is corrupt")
    v.add_argument("dir", help="checkpoint root directory")
    v.add_argument("step", nargs="?", type=int, help="verify only this step (default: every checkpoint)")
    v.set_defaults(func=cmd_verify)


def _store(path: str) -> CheckpointStore:
    from ftrain.checkpoint.store import CheckpointStore

    store = CheckpointStore(path)
    if not store.root.is_dir():
        raise UsageError(f"checkpoint dir {path!r} does not exist or is not a directory")
    return store


def _row(info: CheckpointInfo, latest: str | None) -> dict[str, Any]:
    return {
        "step": info.step,
        "path": str(info.path),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_unix)) if info.created_unix else None,
        "size_bytes": info.size,
        "status": "valid" if info.valid else "corrupt",
        "reason": info.reason or None,
        "latest": info.path.name == latest,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    latest = store.latest_hint()
    rows = [_row(i, latest) for i in store.list()]
    if args.json:
        print(json.dumps({"dir": str(store.root), "latest": latest, "checkpoints": rows}, indent=2))
        return exitcodes.OK
    if not rows:
        print(f"no checkpoints in {store.root}")
        return exitcodes.OK
    print(f"{'STEP':>12}  {'CREATED (UTC)':<20}  {'SIZE':>10}  STATUS")
    for r in rows:
        status = "valid" if r["status"] == "valid" else f"CORRUPT: {r['reason']}"
        mark = "  <- latest" if r["latest"] else ""
        print(f"{r['step']:>12}  {r['created_utc'] or '-':<20}  {_human(r['size_bytes']):>10}  {status}{mark}")
    return exitcodes.OK


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    if args.step is not None:
        if not store.path(args.step).is_dir():
            raise UsageError(f"no checkpoint for step {args.step} in {store.root}")
        infos = [store.info(args.step)]
    else:
        infos = store.list()
        if not infos:
            print(f"no checkpoints in {store.root}")
            return exitcodes.FAILURE
    bad = 0
    for info in infos:
        if info.valid:
            print(f"ok       step {info.step}  {info.path}")
        else:
            bad += 1
            print(f"CORRUPT  step {info.step}  {info.path}/{info.reason}")
    print(f"{len(infos) - bad} valid, {bad} corrupt")
    return exitcodes.FAILURE if bad else exitcodes.OK


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
