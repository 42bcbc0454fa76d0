"""``ftrain ckpt ls|verify|inspect|export``: look into a checkpoint root, or take the weights out.

``ls`` and ``verify`` never load state; ``inspect`` (``inspection.py``) reads one
manifest and ``export`` (``export.py``) one object's tensors. No command
unpickles anything or writes to the checkpoint directory, except ``verify
--quarantine``, which renames what it finds damaged (docs/FORMAT.md,
"Quarantine") while it holds the root's lease. Text that comes from the
directory (paths, reasons, names, values) is printed through ``show.safe``: a
hostile checkpoint cannot send terminal escape sequences or forge lines.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.cli import export, inspection, show
from ftrain.errors import CheckpointError, CorruptCheckpoint, UsageError

if TYPE_CHECKING:  # the store imports torch (seconds); `ftrain launch` must not pay that before its handlers
    from ftrain.checkpoint.lease import Lease
    from ftrain.checkpoint.manifest import Manifest
    from ftrain.checkpoint.retention import Quarantined
    from ftrain.checkpoint.store import CheckpointInfo, CheckpointStore

#: Seconds the lease ``verify --quarantine`` holds lives unrenewed (renewed every third of it while verify runs).
_LEASE_TTL = 60.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ckpt", help="list, verify, inspect and export checkpoints")
    cs = p.add_subparsers(dest="ckpt_command", required=True, parser_class=type(p))
    ls = cs.add_parser("ls", help="table of checkpoints: step, time, size, status")
    ls.add_argument("dir", help="checkpoint root directory")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_ls)
    v = cs.add_parser("verify", help="check sizes, checksums and content as restore does; exit 1 if anything checked "
                                     "is corrupt")
    v.add_argument("dir", help="checkpoint root directory")
    v.add_argument("step", nargs="?", type=int, help="verify only this step (default: every checkpoint)")
    v.add_argument("--quarantine", action="store_true",
                   help="rename each checkpoint found damaged to damaged-step-N, so that restore and retention skip "
                        "it (a local root; holds its lease: refused while a job writes it)")
    v.set_defaults(func=cmd_verify)
    export.add_parser(cs)
    inspection.add_parser(cs)


def _store(path: str) -> CheckpointStore:
    """A local checkpoint root, or a remote tier URL (``s3://bucket/run``, any fsspec URL)."""
    from ftrain.checkpoint.remote import RemoteStorage
    from ftrain.checkpoint.store import open_store

    try:
        store = open_store(path)
        if isinstance(store.storage, RemoteStorage):
            # A prefix is no directory: an empty one is an empty root (like an empty local directory). Only a
            # bucket that does not exist is a mistake (RemoteNotFound, exit 2).
            store.storage.check()
            return store
    except OSError as e:
        raise UsageError(f"checkpoint location {path!r}: {e.strerror or e}") from None
    if not store.root.is_dir():
        raise UsageError(f"checkpoint dir {path!r} does not exist or is not a directory")
    return store


def _row(info: CheckpointInfo, latest: str | None) -> dict[str, Any]:
    return {
        "step": info.step,
        "path": str(info.path),
        "created_utc": show.utc(info.created_unix),  # guarded: a hostile created_unix must not crash ls
        "size_bytes": info.size,
        "status": "valid" if info.valid else "corrupt",
        "reason": info.reason or None,
        "part": info.part or None,
        "latest": info.path.name == latest,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    with show.warnings_to_stderr():  # any warning quoting the directory is sanitised too
        return _ls(args)


def _quarantined_row(store: CheckpointStore, q: Quarantined) -> dict[str, Any]:
    return {"step": q.step, "name": q.name, "path": str(store.root / q.name), "created_utc": None,
            "size_bytes": sum(e.size for e in store.storage.list(q.name) if not e.is_dir), "status": "quarantined",
            "reason": q.note or None, "part": None, "latest": False, "metrics": None, "best": False}


def _ls(args: argparse.Namespace) -> int:
    from ftrain.checkpoint import retention

    store = _store(args.dir)
    latest = store.latest_hint()
    infos = store.infos()
    monitor, values, best = _selection(store, infos)
    rows = [_row(i, latest) for i in infos]
    for r in rows:
        r["metrics"] = values.get(r["step"])
        r["best"] = r["step"] == best
    aside = [_quarantined_row(store, q) for q in retention.quarantined(store)]  # damaged, set aside: not checkpoints
    if args.json:  # ensure_ascii (the default) escapes every control character: safe on a terminal as is
        print(json.dumps({"dir": str(store.root), "latest": latest, "monitor": monitor, "best": best,
                          "checkpoints": rows, "quarantined": aside}, indent=2))
        return exitcodes.OK
    if not rows:
        print(f"no checkpoints in {show.safe(store.root)}")
    _remote_status(store)
    if not rows and not aside:
        return exitcodes.OK
    name = show.safe(monitor["name"])[:12] if monitor else None
    metric_head = f"  {name:>12}" if name else ""
    print(f"{'STEP':>12}  {'CREATED (UTC)':<20}  {'SIZE':>10}{metric_head}  STATUS")
    for r in sorted(rows + aside, key=lambda r: r["step"]):  # stable: a step's checkpoint before its damaged copy
        status = (f"QUARANTINED as {show.safe(r['name'])}: {show.safe(r['reason'] or '?')}"
                  if r["status"] == "quarantined" else
                  f"CORRUPT: {show.safe(r['reason'])}" if r["status"] != "valid" else
                  f"valid ({show.safe(r['part'])}; the rest on other nodes' disks)" if r["part"] else "valid")
        marks = [m for m, on in (("latest", r["latest"]), ("best", r["best"])) if on]
        mark = f"  <- {', '.join(marks)}" if marks else ""
        metric = ""
        if monitor:
            v = (r["metrics"] or {}).get(monitor["name"])
            metric = f"  {show.num(v) if v is not None else '-':>12}"
        size = show.human(r["size_bytes"])
        print(f"{r['step']:>12}  {r['created_utc'] or '-':<20}  {size:>10}{metric}  {status}{mark}")
    return exitcodes.OK


def _remote_status(store: CheckpointStore) -> None:
    """The remote tier's state as the local root records it (``remote.json``): the newest uploaded step, and a
    failure that persists."""
    from ftrain.checkpoint import format

    try:
        status = json.loads(store.storage.read(format.REMOTE_STATUS, format.MAX_POINTER_BYTES * 16))
    except (OSError, ValueError):
        return
    if not isinstance(status, dict):
        return
    up = status.get("uploaded")
    newest = show.safe(up if up is not None else "none")
    line = f"remote tier {show.safe(status.get('remote'))}: newest uploaded step {newest}"
    failing = status.get("failing")
    if isinstance(failing, dict):
        line += (f"; UPLOADS FAILING since {show.utc(failing.get('since')) or '?'} UTC: "
                 f"{show.safe(failing.get('error'))}")
    print(line)


def _selection(store: CheckpointStore, infos: list[CheckpointInfo]
               ) -> tuple[dict[str, str] | None, dict[int, Any], int | None]:
    """(monitor, {step: meta.metrics}, best valid step) for ``ls``; no monitor means no best, not an error."""
    from ftrain.checkpoint.ranking import best_ranking

    values: dict[int, Any] = {}
    manifests: list[Manifest] = []
    for info in infos:
        try:
            manifest = store.read_manifest(info.step)
        except CorruptCheckpoint:
            continue  # the row already says CORRUPT and why
        manifests.append(manifest)
        metrics = manifest.meta.get("metrics")
        if isinstance(metrics, dict):
            values[info.step] = show.jsonable(metrics)
    try:
        name, mode, ranked = best_ranking(manifests)
    except CheckpointError:
        return None, values, None
    valid = {i.step for i in infos if i.valid}
    best = next((m.step for m in ranked if m.step in valid), None)  # what `export --step best` would pick
    return {"name": name, "mode": mode}, values, best


def cmd_verify(args: argparse.Namespace) -> int:
    with show.warnings_to_stderr():
        return _verify(args)


def _verify(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    lease = _lease(store) if args.quarantine else None
    try:
        return _verify_in(store, args.step, lease is not None)
    finally:
        if lease is not None:
            lease.release()


def _verify_in(store: CheckpointStore, step: int | None, quarantine: bool) -> int:
    from ftrain.checkpoint import retention

    if step is not None:
        if not store.path(step).is_dir():
            raise UsageError(f"no checkpoint for step {step} in {store.root}")
        infos = [store.info(step)]
    else:
        infos = store.infos()
        if not infos:
            print(f"no checkpoints in {show.safe(store.root)}")
            return exitcodes.FAILURE
    bad = 0
    for info in infos:
        if info.valid:
            part = f"  ({show.safe(info.part)}; the rest on other nodes' disks)" if info.part else ""
            print(f"ok       step {info.step}  {show.safe(info.path)}{part}")
            continue
        bad += 1
        print(f"CORRUPT  step {info.step}  {show.safe(info.path)}/{show.safe(info.reason)}")
        if quarantine and info.damaged:
            new = retention.quarantine(store, info.step, f"ftrain ckpt verify: {info.reason}")
            print(f"         quarantined as {show.safe(new)}" if new else "         could not be quarantined (see "
                  "the warning)")
        elif quarantine:  # a part of a checkpoint saved to several disks, another ftrain's, or a link
            print("         left in place: not damaged as a whole here (see docs/FORMAT.md, \"Quarantine\")")
    print(f"{len(infos) - bad} valid, {bad} corrupt")
    return exitcodes.FAILURE if bad else exitcodes.OK


def _lease(store: CheckpointStore) -> Lease:
    """The root's lease for ``verify --quarantine``: renaming a checkpoint a running job may be replacing or
    reading is the job's business, so refuse (LeaseError, exit 2) while one holds it."""
    from ftrain.checkpoint.lease import SESSION, Lease, Owner
    from ftrain.checkpoint.remote import RemotePath

    if isinstance(store.root, RemotePath):
        raise UsageError("--quarantine works on a local checkpoint root; the remote tier's copies are managed by "
                         "the uploader's retention")
    lease = Lease(store.root, Owner.current(None, SESSION), ttl=_LEASE_TTL)
    lease.acquire()
    lease.start_renewal()
    return lease
