"""``ftrain ckpt inspect``: describe one checkpoint from its manifest, without loading tensors.

Reads the manifest (its body checksum is verified when parsed) and rank 0's
shard record, for the state trees' aliases (tied weights: one tensor under two
names, counted once), never tensor bytes; ``--verify`` adds the checksum pass
of ``ftrain ckpt verify``. Manifest ``meta`` is free-form
JSON (another ftrain version, or an attacker, wrote it): every key is optional
and type-checked, and odd shapes are shown as JSON. Exit 1 when ``--verify``
finds the chosen step corrupt.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.cli.show import (
    STEP_HELP,
    counts,
    counts_text,
    human,
    jsonable,
    names,
    num,
    open_checkpoint,
    raw,
    safe,
    utc,
    warnings_to_stderr,
)
from ftrain.errors import CheckpointError, CorruptCheckpoint

if TYPE_CHECKING:
    from ftrain.checkpoint.manifest import Manifest
    from ftrain.checkpoint.store import CheckpointStore

log = logging.getLogger("ftrain.cli")


def add_parser(cs: Any) -> None:
    """Register ``inspect`` under ``ftrain ckpt`` (``cs``: its subparsers)."""
    step_help = STEP_HELP
    i = cs.add_parser("inspect", help="describe one checkpoint from its manifest: metrics, selection, config, tensors")
    i.add_argument("dir", help="checkpoint root, or one step-N directory in it")
    i.add_argument("--step", default="latest", help=step_help)
    i.add_argument("--json", action="store_true", help="print one JSON document")
    i.add_argument("--verify", action="store_true", help="also check every file's size and checksum; exit 1 if corrupt")
    i.add_argument("--tensors", action=argparse.BooleanOptionalAction, default=True,
                   help="include the tensor table (default: on)")
    i.set_defaults(func=cmd_inspect)


# ------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    store, which = open_checkpoint(args.dir, args.step)
    with warnings_to_stderr():
        manifest, damage = _pick(store, which, args.verify)
    doc = describe(store, manifest, tensors=args.tensors)
    if args.verify:
        doc["verify"] = "ok" if damage is None else "corrupt"
        doc["verify_error"] = None if damage is None else str(damage)
    if args.json:  # ensure_ascii (the default) escapes every control character
        print(json.dumps(doc, indent=2))
    else:
        # Fields are escaped where they are formatted (so column widths are right); each line once more as a
        # whole, so a field added later cannot send a terminal escape either.
        print("\n".join(safe(line) for line in _text(doc)))
    return exitcodes.FAILURE if damage is not None else exitcodes.OK


def _pick(store: CheckpointStore, which: int | str, verify: bool) -> tuple[Manifest, CorruptCheckpoint | None]:
    """The manifest ``which`` names and, for an explicit step with ``verify``, the damage found (if any).

    ``latest``/``best`` skip damaged checkpoints with a warning, as export and
    restore do: cheap checks (manifest + sizes), or full checksums with ``verify``.
    """
    from ftrain.checkpoint import reader
    from ftrain.checkpoint.ranking import rank_manifests

    if isinstance(which, int):
        manifest = reader.candidates(store, which)[0]
        if verify:
            try:
                store.validate(which)
            except CorruptCheckpoint as e:
                return manifest, e
        return manifest, None
    pool = store.candidates() if which == "latest" else _size_checked(store, rank_manifests(store.manifests()))
    for manifest in pool:
        if verify:
            try:
                store.validate(manifest.step)
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint step %d: %s: %s", manifest.step, e.path, e.reason)
                continue
        return manifest, None
    raise CheckpointError(f"no {which} checkpoint in {store.root} is intact (see `ftrain ckpt ls {store.root}`)")


def _size_checked(store: CheckpointStore, manifests: Iterable[Manifest]) -> Iterator[Manifest]:
    for m in manifests:
        try:
            store.check_files(m, whole=True)
        except CorruptCheckpoint as e:
            log.warning("skipping checkpoint step %d: %s: %s", m.step, e.path, e.reason)
            continue
        yield m


def describe(store: CheckpointStore, m: Manifest, *, tensors: bool = True) -> dict[str, Any]:
    """The JSON summary of checkpoint ``m`` (what ``inspect --json`` prints); meta values sanitised, not trusted."""
    meta = m.meta
    aliases = find_aliases(store, m)
    doc: dict[str, Any] = {
        "path": str(store.path(m.step)), "step": m.step, "created_unix": jsonable(m.created_unix),
        "created_utc": utc(m.created_unix), "world_size": m.world_size, "format_version": m.format_version,
        "ftrain_version": m.ftrain_version, "torch_version": m.torch_version,
        "size_bytes": m.total_bytes, "files": len(m.files),
        "objects": {"replicated": jsonable(meta.get("replicated")), "per_rank": jsonable(meta.get("per_rank"))},
        "metrics": jsonable(meta.get("metrics")), "monitor": jsonable(meta.get("monitor")),
        "selection": jsonable(meta.get("selection")), "best_steps": jsonable(meta.get("best_steps")),
        "frozen": _frozen_counts(meta.get("frozen"), aliases), "aliases": aliases,
        "trainable_only": meta.get("trainable_only") is True,
        "omitted": counts(meta.get("omitted")), "base_fingerprint": jsonable(meta.get("base_fingerprint")),
        "config": jsonable(meta.get("config")), "verify": None, "verify_error": None,
    }
    if tensors:
        doc["tensors"] = [{"name": n, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": t.file}
                          for n, t in sorted(m.tensors.items())]
    return doc


def _text(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<12} {value}")

    row("checkpoint", safe(doc["path"]))
    row("step", doc["step"])
    row("created", doc["created_utc"] or "-")
    row("world size", doc["world_size"])
    row("versions", f"format {safe(doc['format_version'])}, ftrain {safe(doc['ftrain_version'])}, "
                    f"torch {safe(doc['torch_version'])}")
    row("size", f"{human(doc['size_bytes'])} in {doc['files']} data files (manifest.json not counted)")
    objs = doc["objects"]
    row("objects", f"replicated: {names(objs['replicated'])}; per-rank: {names(objs['per_rank'])}")
    if doc["metrics"] is not None:
        metrics = doc["metrics"]
        row("metrics", "  ".join(f"{safe(k)}={num(v)}" for k, v in sorted(metrics.items()))
            if isinstance(metrics, dict) else raw(metrics))
    mon = doc["monitor"]
    if mon is not None:
        ok = isinstance(mon, dict) and isinstance(mon.get("name"), str) and mon.get("mode") in ("min", "max")
        row("monitor", f"{safe(mon['name'])} ({mon['mode']})" if ok else raw(mon))
    sel = doc["selection"] if isinstance(doc["selection"], dict) else {}
    if doc["selection"] is not None or doc["best_steps"] is not None:
        row("best", _best_text(sel.get("best"), doc["best_steps"]))
    if isinstance(sel.get("early_stopping"), dict):
        es = sel["early_stopping"]
        stopped = es.get("stopped_step")
        row("early stop", f"best {num(es.get('best'))} at step {num(es.get('best_step'))}; "
                          f"{num(es.get('evals_without_improvement'))} evaluation(s) without improvement; "
                          + ("not stopped" if stopped is None else f"stopped at step {num(stopped)}"))
    if doc["frozen"] is not None:
        row("frozen", counts_text(doc["frozen"], "frozen parameter(s)"))
    if doc["aliases"]:
        row("aliases", "; ".join(f"{safe(obj)}: " + ", ".join(f"{safe(a)} = {safe(t)}" for a, t in sorted(al.items()))
                                 for obj, al in sorted(doc["aliases"].items())) + " (stored once)")
    if doc["trainable_only"]:
        fp = doc["base_fingerprint"]
        fps = ", ".join(f"{safe(k)}={safe(v)}" for k, v in sorted(fp.items())) if isinstance(fp, dict) else raw(fp)
        row("trainable", f"trainable-only checkpoint; not saved: {counts_text(doc['omitted'], 'frozen tensor(s)')}; "
                         f"base fingerprint {fps}")
    if doc["verify"] is not None:
        row("verify", "ok" if doc["verify"] == "ok" else f"CORRUPT: {safe(doc['verify_error'])}")
    if doc["config"] is not None:
        lines.append("config")
        lines += _config_lines(doc["config"])
    if "tensors" in doc:
        ts = doc["tensors"]
        lines.append(f"tensors      {len(ts)}, {human(sum(t['bytes'] for t in ts))}")
        width = min(64, max([len(safe(t["name"])) for t in ts] + [4]))
        lines.append(f"  {'NAME':<{width}}  {'DTYPE':<9}  {'SHAPE':<16}  {'BYTES':>12}  FILE")
        for t in ts:
            shape = "[" + ", ".join(map(str, t["shape"])) + "]"
            lines.append(f"  {safe(t['name']):<{width}}  {safe(t['dtype']):<9}  {shape:<16}  {t['bytes']:>12}  "
                         f"{safe(t['file'])}")
    return lines


def find_aliases(store: CheckpointStore, m: Manifest) -> dict[str, dict[str, str]] | None:
    """``{object: {alias path: path of the tensor it is}}`` from the replicated tree; None if unreadable.

    Aliases live in the state trees (rank 0's shard record), not in the manifest. A record that does not
    read back is not this command's verdict to give (``--verify`` gives it): the aliases are then unknown.
    """
    from ftrain.checkpoint import format
    from ftrain.checkpoint.shard import read_shard_record

    try:
        record = read_shard_record(store.storage, format.step_dirname(m.step), m, 0)
    except (CorruptCheckpoint, OSError):
        return None
    tree = record.trees.get(format.REPLICATED)
    if not isinstance(tree, dict):
        return None
    out: dict[str, dict[str, str]] = {}
    try:
        for obj, state in tree.items():
            tensors: dict[str, str] = {}  # tensor name -> its path in the object's state
            links: dict[str, str] = {}  # alias path -> the tensor name it refers to
            _walk(state, "", tensors, links)
            if links:
                out[str(obj)] = {path: tensors.get(ref, ref) for path, ref in links.items()}
    except RecursionError:  # nested beyond what a state dict is: not worth a traceback here
        return None
    return out


def _walk(node: Any, path: str, tensors: dict[str, str], links: dict[str, str]) -> None:
    def sub(key: object) -> str:
        return f"{path}/{key}" if path else str(key)

    if isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, sub(i), tensors, links)
    elif isinstance(node, dict):
        tag = node.get("$t")
        ref = node.get("ref")
        if tag == "tensor" and isinstance(ref, str):
            tensors[ref] = path
        elif tag == "alias" and isinstance(ref, str):
            links[path] = ref
        elif tag in ("tuple", "size") and isinstance(node.get("items"), list):
            _walk(node["items"], path, tensors, links)
        elif tag == "dict" and isinstance(node.get("items"), list):
            for item in node["items"]:
                if isinstance(item, list) and len(item) == 2:
                    key = item[0] if isinstance(item[0], (str, int, float, bool)) or item[0] is None else "<key>"
                    _walk(item[1], sub(key), tensors, links)
        elif tag is None:
            for k, v in node.items():
                _walk(v, sub(k), tensors, links)


def _frozen_counts(frozen: Any, aliases: dict[str, dict[str, str]] | None) -> Any:
    """meta.frozen as {object: count}, a tied parameter counted once (meta lists every name it has)."""
    if not (isinstance(frozen, dict) and all(isinstance(x, list) for x in frozen.values())):
        return counts(frozen)
    out = {}
    for obj, names_ in frozen.items():
        al = (aliases or {}).get(str(obj), {})
        have = {n for n in names_ if isinstance(n, str)}
        out[str(obj)] = len([n for n in names_ if not (isinstance(n, str) and al.get(n) in have)])
    return out


def _best_text(best: Any, best_steps: Any) -> str:
    if isinstance(best, list) and all(isinstance(b, list) and len(b) == 2 for b in best):
        return ", ".join(f"step {num(s)} ({num(v)})" for v, s in best) or "none yet"
    if isinstance(best_steps, list):
        return "steps " + (", ".join(num(s) for s in best_steps) or "none yet")
    return raw(best if best is not None else best_steps)


def _config_lines(config: Any) -> list[str]:
    """``  section.key = value`` per key; nested sections (manifests since config sections nest) are walked, and the
    flat ``{section: {key: value}}`` of older manifests reads the same way."""
    if not isinstance(config, dict):
        return [f"  {raw(config)}"]
    out: list[str] = []

    def walk(prefix: str, values: dict[Any, Any], depth: int) -> None:
        for name, value in sorted(values.items(), key=lambda kv: str(kv[0])):
            if isinstance(value, dict) and depth < 4:  # the manifest is input: its depth is bounded here
                walk(f"{prefix}{safe(name)}.", value, depth + 1)
            else:
                out.append(f"  {prefix}{safe(name)} = {json.dumps(value)}")
    walk("", config, 0)
    return out
