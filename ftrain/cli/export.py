"""``ftrain ckpt export``: take one object's weights out of a checkpoint.

Reads and checksums every byte of the chosen checkpoint
(:func:`ftrain.checkpoint.reader.load`), materialises only that object's tensors
and writes them as safetensors, a plain ``torch.save`` dict, or (``--format
dcp``) a torch.distributed.checkpoint directory of flat keys written by DCP's own
``save`` in this one process, which DCP, torchtitan and load_pretrained load
(at any world size: DCP reshards). OUT appears atomically (temp file or
directory beside it, fsync, rename). OUT's name may be a template
filled from the chosen checkpoint (``{step}``, ``{object}``, its metrics).
Tied weights (names the checkpoint stores as one tensor) are written once to
safetensors, the other names listed in its metadata ``ftrain_aliases``
(``{dropped: kept}``), kept as names of one shared tensor in a torch file, and
written under every name to DCP (whose loaders look every name up).

Exit codes: 1 for anything about the checkpoint (none selected, damaged, no such
object, not a flat state_dict) or a write failing part way; 2 for bad input,
checked before any checkpoint byte is read where possible (bad ``--step``,
format or suffix, DIR missing, OUT exists without ``--force`` (for dcp: a file,
or a directory that is not empty, ``--force`` or not: nothing is deleted), OUT's
directory missing or unwritable, a template field the checkpoint lacks). Never writes to
the checkpoint directory. torch, DCP and safetensors are imported lazily:
``ftrain launch`` builds this parser too.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import exitcodes
from ftrain.cli.show import STEP_HELP, get_dict, human, jsonable, open_checkpoint, safe, warnings_to_stderr
from ftrain.errors import CheckpointError, FtrainError, UsageError

if TYPE_CHECKING:
    import torch

    from ftrain.checkpoint.manifest import Manifest
    from ftrain.checkpoint.store import CheckpointStore

log = logging.getLogger("ftrain.cli")

SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}


class ExportError(FtrainError):
    """Writing the export failed after it started (disk full, I/O error); OUT was left untouched. Exit 1."""


def add_parser(cs: Any) -> None:
    """Register ``export`` under ``ftrain ckpt`` (``cs``: its subparsers)."""
    step_help = STEP_HELP
    e = cs.add_parser("export", help="write one object's weights (default: model) as safetensors, a torch file "
                      "or a DCP directory")
    e.add_argument("dir", help="checkpoint root, or one step-N directory in it")
    e.add_argument("out", help="output file, or with --format dcp a new (or empty) directory; the format follows "
                   "its suffix (.safetensors, .pt, .pth); its name may be a template with {step}, {object} and the "
                   "checkpoint's metrics, e.g. 'model-{step:06d}-{val_loss:.4f}.safetensors'")
    e.add_argument("--step", default="latest", help=step_help)
    e.add_argument("--format", choices=("safetensors", "torch", "dcp"),
                   help="output format (default: from OUT's suffix); dcp: a torch.distributed.checkpoint directory of "
                   "flat keys, loadable by torch.distributed.checkpoint.load, torchtitan and load_pretrained")
    e.add_argument("--object", default="model", dest="obj", metavar="NAME",
                   help="registered object to export; must be a flat {name: tensor} state_dict (default: model)")
    e.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    e.set_defaults(func=cmd_export)


# ------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    fmt = _format(args.out, args.format)
    out = Path(args.out)
    templated = "{" in out.name  # Keras-style file name template, filled in once the checkpoint is chosen
    store, which = open_checkpoint(args.dir, args.step)
    make_temp = _create_temp_dir if fmt == "dcp" else _create_temp
    tmp = make_temp(out, args.force, check_exists=not templated)  # a bad OUT fails now, not after reading GBs
    try:
        with warnings_to_stderr():
            from ftrain.checkpoint import reader, storage
            from ftrain.checkpoint.ranking import rank_manifests

            manifest, objects = reader.load(store, which, name=args.obj, rank=rank_manifests)
            if templated:
                out = out.parent / _render(out.name, manifest, args.obj)
                if fmt == "dcp":
                    _check_dcp_out(out)
                elif out.exists() and not args.force:
                    raise UsageError(f"output {str(out)!r} already exists; pass --force to replace it")
            tensors, aliases = _flat_tensors(objects[args.obj], args.obj)
            metadata = _st_metadata(store, manifest, args.obj)
            if fmt == "safetensors":
                # safetensors refuses shared tensors; its save_model drops all names but one, and so do we:
                # loaders re-tie (transformers: tie_word_embeddings; load_pretrained: the model's shared tensor).
                tensors = {k: v for k, v in tensors.items() if k not in aliases}
                metadata["ftrain_aliases"] = json.dumps(aliases, sort_keys=True)
            if fmt == "dcp":
                _write_dcp(tmp, out, tensors)
                _rename_dir(tmp, out)
            else:
                _write(tmp, out, tensors, fmt, metadata)
                if out.exists() and not args.force:  # checked again: someone may have created it while we read
                    raise UsageError(f"{out} appeared while exporting; not replaced (use --force)")
                os.replace(tmp, out)
        with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync; the file itself is durable
            storage.fsync_dir(out.parent)
    except BaseException:
        # Never leave a partial file behind, whatever failed (Ctrl-C included); tmp is ours, made by make_temp.
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    meta = manifest.meta
    omitted_by_object = meta.get("omitted", {})
    omitted = omitted_by_object.get(args.obj, []) if isinstance(omitted_by_object, dict) else None
    n = len(omitted) if isinstance(omitted, list) else "an unknown number of"
    if meta.get("trainable_only") is True and n != 0:
        fp = get_dict(meta, "base_fingerprint").get(args.obj)
        print(f"ftrain: note: step {manifest.step} is a trainable-only checkpoint: the {n} frozen base tensor(s) of "
              f"{args.obj!r} (meta.omitted) are not in {safe(out)}; load it over the base weights"
              f"{f' with fingerprint {safe(fp)}' if isinstance(fp, str) else ''} (load_state_dict(strict=False))",
              file=sys.stderr)
    if aliases:
        shown = ", ".join(f"{safe(a)} = {safe(k)}" for a, k in sorted(aliases.items())[:3])
        more = f", ... ({len(aliases)} in all)" if len(aliases) > 3 else ""
        if fmt == "dcp":
            print(f"ftrain: note: {len(aliases)} tied tensor name(s) of {args.obj!r} share a tensor with another "
                  f"({shown}{more}); DCP stores it under each name and loaders tie them again", file=sys.stderr)
        elif fmt == "safetensors":
            print(f"ftrain: note: {len(aliases)} tied tensor name(s) of {args.obj!r} share a tensor with another and "
                  f"are not written again ({shown}{more}); the dropped names are in the metadata 'ftrain_aliases' "
                  "({dropped: kept}); a model that ties them gets them by load_state_dict(strict=False) or "
                  "load_pretrained", file=sys.stderr)
        else:
            print(f"ftrain: note: {len(aliases)} tied tensor name(s) of {args.obj!r} share one tensor with another "
                  f"({shown}{more}); torch.save stores it once and loading keeps them shared", file=sys.stderr)
    size = sum(f.stat().st_size for f in out.iterdir()) if fmt == "dcp" else out.stat().st_size
    print(f"exported step {manifest.step} object {args.obj!r}: {len(tensors)} tensors, {human(size)} "
          f"({size} bytes) -> {safe(out)} ({fmt})")  # OUT may name a hostile directory (a shell glob)
    return exitcodes.OK


def _format(out: str, fmt: str | None) -> str:
    fmt = fmt or SUFFIXES.get(Path(out).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {out!r} from its suffix: name it .safetensors, .pt or .pth, "
                         "or pass --format safetensors|torch|dcp (dcp writes a directory)")
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


def _check_dcp_out(out: Path) -> None:
    # No --force here: replacing a directory means deleting one, and OUT may be a typo for something precious.
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"output {str(out)!r} exists and is not a directory; --format dcp writes a directory: "
                         "choose a new name")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"output directory {str(out)!r} is not empty; --format dcp writes a new or empty "
                         "directory and deletes nothing (--force or not): remove it or choose another name")


def _create_temp_dir(out: Path, force: bool, check_exists: bool = True) -> Path:
    """A new directory beside OUT for DCP to write into (``force`` does not apply: see :func:`_check_dcp_out`)."""
    if check_exists:
        _check_dcp_out(out)
    if not out.parent.is_dir():
        raise UsageError(f"output directory {str(out.parent)!r} does not exist")
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.exporting"  # the name rule of _create_temp
    try:
        tmp.mkdir()
    except OSError as e:
        raise UsageError(f"cannot write to {str(out.parent)!r} ({e.strerror or e}); choose a writable OUT") from None
    return tmp


def _write_dcp(tmp: Path, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed, which --format dcp needs; "
                         "export with --format safetensors")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # DCP warns that it assumes one process, as no_dist=True says
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
            # no_dist: this process alone writes every tensor, whole; sync_files (the default) fsyncs each file.
            dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
    except OSError as e:
        raise ExportError(f"writing {out} failed: {e.strerror or e} (disk full or quota?); it was not created "
                          "or changed") from None
    except (CheckpointException, RuntimeError, ValueError) as e:  # CheckpointException: DCP's wrapper of a failure
        raise ExportError(f"DCP could not write {out} ({e}); it was not created or changed") from None


def _rename_dir(tmp: Path, out: Path) -> None:
    # rename(2) replaces an empty directory and refuses a non-empty one: no check-then-act race with a writer.
    try:
        os.rename(tmp, out)
    except OSError as e:
        if out.exists():
            raise UsageError(f"{out} appeared (or was filled) while exporting; not replaced ({e.strerror or e})"
                             ) from None
        raise ExportError(f"renaming the finished export to {out} failed: {e.strerror or e}") from None


def _flat_tensors(state: Any, obj: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state as {name: tensor}, {alias: kept name})``; non-tensor entries are skipped with a warning, nested
    state is refused.

    Names that the checkpoint stores as one tensor (aliases: tied weights) map to one tensor object here; the
    first name in state-dict order is the kept one (the one the checkpoint stores; for transformers models the
    input embedding, which is also what their save_pretrained keeps).
    """
    import torch

    hint = "export writes a module's flat {name: tensor} state_dict; pick one with --object (default: model)"
    if not isinstance(state, dict):
        raise CheckpointError(f"object {obj!r} is a {type(state).__name__}, not a module state_dict; {hint}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    skipped: list[str] = []
    first: dict[int, str] = {}  # id of a decoded tensor -> the first name it has
    seen: set[int] = set()
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            if id(value) in first:  # an alias: the reader decodes every name of a stored tensor to one object
                aliases[key] = first[id(value)]
                tensors[key] = tensors[first[id(value)]]
                continue
            first[id(value)] = key
            t = value.detach().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:  # distinct tensors never share storage after reading; but be sure
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
    return tensors, aliases


def _holds_state(value: Any) -> bool:
    scalar = (bool, int, float, str, type(None))
    if isinstance(value, dict):
        return True
    return isinstance(value, (list, tuple)) and not all(isinstance(v, scalar) for v in value)


def _st_metadata(store: CheckpointStore, m: Manifest, obj: str) -> dict[str, str]:
    meta = m.meta
    out = {"format": "pt", "ftrain_step": str(m.step), "ftrain_source": str(store.path(m.step).resolve()),
           "ftrain_object": obj, "ftrain_metrics": json.dumps(jsonable(get_dict(meta, "metrics")), sort_keys=True)}
    if meta.get("trainable_only") is True:
        out["ftrain_trainable_only"] = "true"
        fp = get_dict(meta, "base_fingerprint").get(obj)
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
