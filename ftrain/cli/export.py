"""``ftrain ckpt export|inspect``: take one object's weights out of a checkpoint, or describe one.

``export`` reads and checksums every byte of the chosen checkpoint
(:func:`ftrain.checkpoint.reader.load`), materialises only that object's tensors
and writes them as safetensors or a plain ``torch.save`` dict; OUT appears
atomically (temp file beside it, fsync, rename). ``inspect`` reads the manifest
only; ``--verify`` adds the checksum pass of ``ftrain ckpt verify``. Manifest
``meta`` is free-form JSON (another ftrain version, or an attacker, wrote it):
every key is optional and type-checked, and odd shapes are shown as JSON.

Exit codes: 1 for anything about the checkpoint (none selected, damaged, no such
object, not a flat state_dict, ``--verify`` found damage) or a write failing part
way; 2 for bad input, checked before any checkpoint byte is read (bad ``--step``,
format or suffix, DIR missing, OUT exists without ``--force``, OUT's directory
missing or unwritable). Neither command writes to the checkpoint directory.
torch and safetensors are imported lazily: ``ftrain launch`` builds this parser too.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.errors import CheckpointError, CorruptCheckpoint, FtrainError, UsageError

if TYPE_CHECKING:
    import torch

    from ftrain.checkpoint.manifest import Manifest
    from ftrain.checkpoint.store import CheckpointStore

log = logging.getLogger("ftrain.cli")

SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
_MAX_DEPTH = 32  # meta nested deeper than this is shown as "..." (a hostile manifest must not blow the stack)


class ExportError(FtrainError):
    """Writing the export failed after it started (disk full, I/O error); OUT was left untouched. Exit 1."""


def add_parsers(cs: Any) -> None:
    """Register ``export`` and ``inspect`` under ``ftrain ckpt`` (``cs``: its subparsers)."""
    step_help = "a step number, 'latest' (default: newest intact) or 'best' (best monitored metric)"
    e = cs.add_parser("export", help="write one object's weights (default: model) as safetensors or a torch file")
    e.add_argument("dir", help="checkpoint root, or one step-N directory in it")
    e.add_argument("out", help="output file; the format follows its suffix (.safetensors, .pt, .pth); its name may "
                   "be a template with {step}, {object} and the checkpoint's metrics, e.g. "
                   "'model-{step:06d}-{val_loss:.4f}.safetensors'")
    e.add_argument("--step", default="latest", help=step_help)
    e.add_argument("--format", choices=("safetensors", "torch"), help="output format (default: from OUT's suffix)")
    e.add_argument("--object", default="model", dest="obj", metavar="NAME",
                   help="registered object to export; must be a flat {name: tensor} state_dict (default: model)")
    e.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    e.set_defaults(func=cmd_export)
    i = cs.add_parser("inspect", help="describe one checkpoint from its manifest: metrics, selection, config, tensors")
    i.add_argument("dir", help="checkpoint root, or one step-N directory in it")
    i.add_argument("--step", default="latest", help=step_help)
    i.add_argument("--json", action="store_true", help="print one JSON document")
    i.add_argument("--verify", action="store_true", help="also check every file's size and checksum; exit 1 if corrupt")
    i.add_argument("--tensors", action=argparse.BooleanOptionalAction, default=True,
                   help="include the tensor table (default: on)")
    i.set_defaults(func=cmd_inspect)


# ------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    fmt = _format(args.out, args.format)
    out = Path(args.out)
    templated = "{" in out.name  # Keras-style file name template, filled in once the checkpoint is chosen
    store, which = _open(args.dir, args.step)
    tmp = _create_temp(out, args.force, check_exists=not templated)  # a bad OUT fails now, not after reading GBs
    try:
        with _warnings_to_stderr():
            from ftrain.checkpoint import layout, reader

            manifest, objects = reader.load(store, which, name=args.obj)
            if templated:
                out = out.parent / _render(out.name, manifest, args.obj)
                if out.exists() and not args.force:
                    raise UsageError(f"output {str(out)!r} already exists; pass --force to replace it")
            tensors = _flat_tensors(objects[args.obj], args.obj)
            _write(tmp, out, tensors, fmt, _st_metadata(store, manifest, args.obj))
            if out.exists() and not args.force:  # checked again: someone may have created it while we read
                raise UsageError(f"{out} appeared while exporting; not replaced (use --force)")
            os.replace(tmp, out)
        with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync; the file itself is durable
            layout.fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind, whatever failed (Ctrl-C included)
        raise
    meta = manifest.meta
    omitted_by_object = meta.get("omitted", {})
    omitted = omitted_by_object.get(args.obj, []) if isinstance(omitted_by_object, dict) else None
    n = len(omitted) if isinstance(omitted, list) else "an unknown number of"
    if meta.get("trainable_only") is True and n != 0:
        fp = _get_dict(meta, "base_fingerprint").get(args.obj)
        print(f"ftrain: note: step {manifest.step} is a trainable-only checkpoint: the {n} frozen base tensor(s) of "
              f"{args.obj!r} (meta.omitted) are not in {out}; load it over the base weights"
              f"{f' with fingerprint {safe(fp)}' if isinstance(fp, str) else ''} (load_state_dict(strict=False))",
              file=sys.stderr)
    size = out.stat().st_size
    print(f"exported step {manifest.step} object {args.obj!r}: {len(tensors)} tensors, {human(size)} "
          f"({size} bytes) -> {out} ({fmt})")
    return exitcodes.OK


def _format(out: str, fmt: str | None) -> str:
    fmt = fmt or SUFFIXES.get(Path(out).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {out!r} from its suffix: name it .safetensors, .pt or .pth, "
                         "or pass --format safetensors|torch")
    if fmt == "safetensors" and importlib.util.find_spec("safetensors") is None:  # now, not after reading GBs
        raise UsageError("the safetensors package is not installed (pip install safetensors); "
                         "or export with --format torch")
    return fmt


def _render(template: str, m: Manifest, obj: str) -> str:
    """Fill a file name template with the step, the object name and the checkpoint's metrics."""
    fields: dict[str, Any] = {}
    metrics = m.meta.get("metrics")
    for name, value in (metrics.items() if isinstance(metrics, dict) else ()):
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fields[str(name)] = value
    fields.update(step=m.step, object=obj)
    try:
        name = template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"cannot fill the OUT template {template!r} for step {m.step} ({type(e).__name__}: {e}); "
                         f"fields available there: {', '.join(sorted(fields))}") from None
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(f"the OUT template {template!r} gives the file name {name!r}")
    return name


def _create_temp(out: Path, force: bool, check_exists: bool = True) -> Path:
    if check_exists and out.is_dir():
        raise UsageError(f"output {str(out)!r} is a directory; give a file name")
    if check_exists and out.exists() and not force:
        raise UsageError(f"output {str(out)!r} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"output directory {str(out.parent)!r} does not exist")
    # Not *.partial / .tmp-*: if OUT lies inside a checkpoint root, a starting job's cleanup would delete those.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.exporting"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666: the umask decides, as for cp
    except OSError as e:
        raise UsageError(f"cannot write to {str(out.parent)!r} ({e.strerror or e}); choose a writable OUT") from None
    return tmp


def _flat_tensors(state: Any, obj: str) -> dict[str, torch.Tensor]:
    """``state`` as {name: tensor}; non-tensor entries are skipped with a warning, nested state is refused."""
    import torch

    hint = "export writes a module's flat {name: tensor} state_dict; pick one with --object (default: model)"
    if not isinstance(state, dict):
        raise CheckpointError(f"object {obj!r} is a {type(state).__name__}, not a module state_dict; {hint}")
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    seen: set[int] = set()
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            t = value.detach().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:  # safetensors refuses shared storage; the reader never shares, but be sure
                t = t.clone()
            seen.add(ptr)
            tensors[key] = t
        elif isinstance(key, str) and (key.endswith("_extra_state") or not _holds_state(value)):
            skipped.append(key)  # a module's extra state or a plain value: not weights
        else:
            raise CheckpointError(f"object {obj!r} is not a module state_dict (entry {key!r} holds a "
                                  f"{type(value).__name__}); {hint}")
    if skipped:
        log.warning("not exported (not tensors): %s", ", ".join(safe(k) for k in skipped))
    if not tensors:
        raise CheckpointError(f"object {obj!r} holds no tensors to export; {hint}")
    return tensors


def _holds_state(value: Any) -> bool:
    scalar = (bool, int, float, str, type(None))
    return isinstance(value, dict) or isinstance(value, (list, tuple)) and not all(isinstance(v, scalar) for v in value)


def _st_metadata(store: CheckpointStore, m: Manifest, obj: str) -> dict[str, str]:
    meta = m.meta
    out = {"format": "pt", "ftrain_step": str(m.step), "ftrain_source": str(store.path(m.step).resolve()),
           "ftrain_object": obj, "ftrain_metrics": json.dumps(jsonable(_get_dict(meta, "metrics")), sort_keys=True)}
    if meta.get("trainable_only") is True:
        out["ftrain_trainable_only"] = "true"
        fp = _get_dict(meta, "base_fingerprint").get(obj)
        if isinstance(fp, str):
            out["ftrain_base_fingerprint"] = fp
    return out


def _write(tmp: Path, out: Path, tensors: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> None:
    try:
        if fmt == "safetensors":
            import safetensors
            import safetensors.torch

            try:
                safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
            except (safetensors.SafetensorError, ValueError, TypeError, RuntimeError) as e:
                raise ExportError(f"safetensors cannot store this state ({e}); try --format torch") from None
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            import torch

            with open(tmp, "wb") as f:
                # A plain dict of tensors: loads with torch.load(weights_only=True) and load_state_dict as is.
                torch.save(dict(tensors), f)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise ExportError(f"writing {out} failed: {e.strerror or e} (disk full or quota?); it was not created "
                          "or changed") from None


# ------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    store, which = _open(args.dir, args.step)
    with _warnings_to_stderr():
        manifest, damage = _pick(store, which, args.verify)
    doc = describe(store, manifest, tensors=args.tensors)
    if args.verify:
        doc["verify"] = "ok" if damage is None else "corrupt"
        doc["verify_error"] = None if damage is None else str(damage)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(_text(doc)))
    return exitcodes.FAILURE if damage is not None else exitcodes.OK


def _pick(store: CheckpointStore, which: int | str, verify: bool) -> tuple[Manifest, CorruptCheckpoint | None]:
    """The manifest ``which`` names and, for an explicit step with ``verify``, the damage found (if any).

    ``latest``/``best`` skip damaged checkpoints with a warning, as export and
    restore do: cheap checks (manifest + sizes), or full checksums with ``verify``.
    """
    from ftrain.checkpoint import reader

    if isinstance(which, int):
        manifest = reader.candidates(store, which)[0]
        if verify:
            try:
                store.validate(which)
            except CorruptCheckpoint as e:
                return manifest, e
        return manifest, None
    pool = store.candidates() if which == "latest" else _size_checked(store, reader.best_ranking(store)[2])
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
            store.check_files(m)
        except CorruptCheckpoint as e:
            log.warning("skipping checkpoint step %d: %s: %s", m.step, e.path, e.reason)
            continue
        yield m


def describe(store: CheckpointStore, m: Manifest, *, tensors: bool = True) -> dict[str, Any]:
    """The JSON summary of checkpoint ``m`` (what ``inspect --json`` prints); meta values sanitised, not trusted."""
    meta = m.meta
    doc: dict[str, Any] = {
        "path": str(store.path(m.step)), "step": m.step, "created_unix": jsonable(m.created_unix),
        "created_utc": utc(m.created_unix), "world_size": m.world_size, "format_version": m.format_version,
        "ftrain_version": m.ftrain_version, "torch_version": m.torch_version,
        "size_bytes": m.total_bytes, "files": len(m.files),
        "objects": {"replicated": jsonable(meta.get("replicated")), "per_rank": jsonable(meta.get("per_rank"))},
        "metrics": jsonable(meta.get("metrics")), "monitor": jsonable(meta.get("monitor")),
        "selection": jsonable(meta.get("selection")), "best_steps": jsonable(meta.get("best_steps")),
        "frozen": _counts(meta.get("frozen")), "trainable_only": meta.get("trainable_only") is True,
        "omitted": _counts(meta.get("omitted")), "base_fingerprint": jsonable(meta.get("base_fingerprint")),
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
    row("versions", f"format {doc['format_version']}, ftrain {safe(doc['ftrain_version'])}, "
                    f"torch {safe(doc['torch_version'])}")
    row("size", f"{human(doc['size_bytes'])} in {doc['files']} data files (manifest.json not counted)")
    objs = doc["objects"]
    row("objects", f"replicated: {_names(objs['replicated'])}; per-rank: {_names(objs['per_rank'])}")
    if doc["metrics"] is not None:
        metrics = doc["metrics"]
        row("metrics", "  ".join(f"{safe(k)}={num(v)}" for k, v in sorted(metrics.items()))
            if isinstance(metrics, dict) else _raw(metrics))
    mon = doc["monitor"]
    if mon is not None:
        ok = isinstance(mon, dict) and isinstance(mon.get("name"), str) and mon.get("mode") in ("min", "max")
        row("monitor", f"{safe(mon['name'])} ({mon['mode']})" if ok else _raw(mon))
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
        row("frozen", _counts_text(doc["frozen"], "frozen parameter(s)"))
    if doc["trainable_only"]:
        fp = doc["base_fingerprint"]
        fps = ", ".join(f"{safe(k)}={safe(v)}" for k, v in sorted(fp.items())) if isinstance(fp, dict) else _raw(fp)
        row("trainable", f"trainable-only checkpoint; not saved: {_counts_text(doc['omitted'], 'frozen tensor(s)')}; "
                         f"base fingerprint {fps}")
    if doc["verify"] is not None:
        row("verify", "ok" if doc["verify"] == "ok" else f"CORRUPT: {doc['verify_error']}")
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
            lines.append(f"  {safe(t['name']):<{width}}  {t['dtype']:<9}  {shape:<16}  {t['bytes']:>12}  {t['file']}")
    return lines


def _best_text(best: Any, best_steps: Any) -> str:
    if isinstance(best, list) and all(isinstance(b, list) and len(b) == 2 for b in best):
        return ", ".join(f"step {num(s)} ({num(v)})" for v, s in best) or "none yet"
    if isinstance(best_steps, list):
        return "steps " + (", ".join(num(s) for s in best_steps) or "none yet")
    return _raw(best if best is not None else best_steps)


def _config_lines(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return [f"  {_raw(config)}"]
    out = []
    for section, values in sorted(config.items()):
        if isinstance(values, dict):
            out += [f"  {safe(section)}.{safe(k)} = {json.dumps(v)}" for k, v in sorted(values.items())]
        else:
            out.append(f"  {safe(section)} = {json.dumps(values)}")
    return out


# ----------------------------------------------------------------- helpers
def _open(path: str, step: str) -> tuple[CheckpointStore, int | str]:
    from ftrain.checkpoint import reader

    if not os.path.isdir(path):  # exit 2 like `ckpt ls`: a mistyped path is bad input, not a damaged checkpoint
        raise UsageError(f"checkpoint dir {path!r} does not exist or is not a directory")
    try:
        which = reader.parse_selector(step)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    return reader.open_path(path, which)


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """ftrain's warnings ("skipping checkpoint step N") as ``ftrain: warning:`` lines on stderr.

    Nothing configures logging in ``ftrain ckpt``: Python's last-resort handler would
    print them bare, or not at all once a host (a test runner) configures the root logger.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("ftrain: warning: %(message)s"))
    logger = logging.getLogger("ftrain")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def utc(ts: Any) -> str | None:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None
    except (OverflowError, OSError, ValueError, TypeError):  # a hostile created_unix (1e300, inf)
        return None


def jsonable(v: Any, depth: int = 0) -> Any:
    """``v`` (parsed JSON) as strict JSON: non-finite floats as "nan"/"inf"/"-inf" strings, depth capped."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth >= _MAX_DEPTH:
        return "..."
    if isinstance(v, dict):
        return {str(k): jsonable(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x, depth + 1) for x in v]
    return repr(v)


def _get_dict(meta: dict[str, Any], key: str) -> dict[str, Any]:
    v = meta.get(key)
    return v if isinstance(v, dict) else {}


def _counts(v: Any) -> Any:
    """{object: [names]} as {object: count}; any other shape as sanitised JSON."""
    if isinstance(v, dict) and all(isinstance(x, list) for x in v.values()):
        return {str(k): len(x) for k, x in v.items()}
    return jsonable(v)


def _counts_text(v: Any, what: str) -> str:
    if isinstance(v, dict) and all(isinstance(x, int) for x in v.values()):
        return ", ".join(f"{safe(k)}: {n} {what}" for k, n in sorted(v.items())) or "none"
    return _raw(v)


def _names(v: Any) -> str:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return ", ".join(safe(x) for x in v) or "-"
    return _raw(v)


def num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if v in ("nan", "inf", "-inf"):
        return str(v)
    return json.dumps(v)


def _raw(v: Any) -> str:
    text = json.dumps(v)
    return f"{text[:200]}{'...' if len(text) > 200 else ''} (unexpected shape)"


def safe(s: Any) -> str:
    """A name from a file, printable: no terminal escape sequences or line breaks reach the screen."""
    s = str(s)
    return s if s.isprintable() else json.dumps(s)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
