"""Load pretrained weights into a model for fine-tuning: :func:`load_pretrained`.

A fine-tuning run starts from weights that were saved by somebody else, by a
differently wrapped model (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``)
or for another task (a new classification head). This module reads them without
running code, renames keys, compares them with the model and copies what fits,
reporting every key that did not.

Invariants:

* Nothing from a file is unpickled beyond ``torch.load(weights_only=True)``:
  a ``.pt`` file that needs arbitrary pickle is refused, never loaded "unsafely"
  (a DCP directory's ``.metadata`` pickle goes through an allowlist of DCP's own
  types: :mod:`ftrain.finetune.dcp`).
* All checks happen before the first copy: when :func:`load_pretrained` raises,
  the model is unchanged.
* Parameters are updated in place (``load_state_dict`` copies under ``no_grad``),
  so their identity and ``requires_grad`` flags survive and an optimizer built
  earlier stays valid.

Thread-safety: pure functions, but loading mutates ``model``; do not train it
from another thread meanwhile.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftrain.checkpoint import reader
from ftrain.checkpoint.ranking import rank_manifests
from ftrain.errors import CheckpointError, CorruptCheckpoint, FtrainError, StateMismatch
from ftrain.finetune import dcp

log = logging.getLogger("ftrain")

#: Entries a training script's ``torch.save({...})`` commonly wraps its state dict in.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
ACCEPTED = ("*.safetensors, *.pt/*.pth/*.bin (a torch state_dict, loaded with weights_only=True), "
            "an ftrain checkpoint directory or one of its step-N directories, a torch.distributed.checkpoint (DCP) "
            "directory (with a .metadata file), or a mapping {key: tensor}")

Shape = tuple[int, ...]
KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. Key lists are in model order (``unexpected``: source order).

    ``mismatched`` holds ``(key, source shape, model shape)``; a shape is ``None``
    where that side is not a tensor. ``cast`` holds ``(key, source dtype, model dtype)``.
    ``tied`` lists model keys that share their tensor with a loaded key, so they
    count as loaded although the source (deduplicated, as safetensors does) lacks them.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape | None, Shape | None]] = field(default_factory=list)
    cast: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)
    renamed: int = 0
    stripped_prefix: str = ""
    dropped: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every source key used (a property, not a method)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        head = (f"load_pretrained from {self.source}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched, {len(self.cast)} cast")
        extras = []
        if self.stripped_prefix:
            extras.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.renamed:
            extras.append(f"{self.renamed} keys renamed")
        if self.dropped:
            extras.append(f"{len(self.dropped)} keys dropped by key_map")
        lines = [head + (f" ({', '.join(extras)})" if extras else "")]
        if not self.loaded and self.missing and self.unexpected:  # usually a prefix problem, e.g. a DDP-wrapped model
            lines.append(f"  nothing loaded: source keys look like {self.unexpected[0]!r}, model keys like "
                         f"{self.missing[0]!r}; rename with key_map= or add_prefix=")
        sections: list[tuple[str, list[str]]] = [
            ("missing (model keys the source lacks; left at their current values)", self.missing),
            ("unexpected (source keys the model lacks; ignored)", self.unexpected),
            ("mismatched (shape differs; not loaded)",
             [f"{k}: source {_fmt_shape(s)} vs model {_fmt_shape(m)}" for k, s, m in self.mismatched]),
            ("cast", [f"{k}: {_dtype(s)} -> {_dtype(m)}" for k, s, m in self.cast]),
            ("tied (loaded through a shared tensor)", self.tied),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {item}" for item in items[:10])
                if len(items) > 10:
                    lines.append(f"    ... and {len(items) - 10} more")
        return "\n".join(lines)


def load_pretrained(model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = False,
                    skip_mismatched: bool = False, strip_prefixes: Sequence[str] = ("module.", "_orig_mod."),
                    add_prefix: str = "", key_map: KeyMap | None = None, object_name: str = "model",
                    step: int | str | None = None, log_report: bool = True) -> LoadReport:
    """Copy the weights in ``source`` into ``model`` in place and report what matched.

    ``source`` is a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` state dict
    (``weights_only=True``; a dict whose only tensor-holding entry is one of
    :data:`WRAPPER_KEYS` is unwrapped), an ftrain checkpoint root or ``step-N``
    directory (object ``object_name`` of checkpoint ``step``: a number,
    ``"latest"`` (default) or ``"best"``), a torch.distributed.checkpoint (DCP)
    directory holding flat keys (``ftrain ckpt export --format dcp``, torchtitan's
    model-only checkpoints), or a mapping ``{key: tensor}``.

    A DCP directory is read by DCP itself, after every check below ran on its
    metadata: each tensor lands in a new buffer shaped like the model's (for an
    FSDP2 model a DTensor, so each rank reads only its shard) and is then copied
    in. Its non-tensor entries are not read (DCP stores them as pickles). Under an
    initialized process group this is a collective: call it on every rank.

    Keys are renamed in this order: (1) each of ``strip_prefixes`` is removed
    when *every* source key carries it and *no* model key does (repeated until
    none applies, so ``module._orig_mod.`` goes too); (2) ``key_map``: a mapping
    from source-key prefixes to replacements (longest prefix wins; a value of
    ``None`` drops the key) or a callable returning the new key or ``None`` to
    drop it; (3) ``add_prefix`` is prepended.

    Then every model key is loaded, missing, or mismatched (shape differs), and
    every other source key is unexpected. Dtypes are cast to the model's.
    ``strict=True`` raises :class:`StateMismatch` on any missing, unexpected or
    (unless ``skip_mismatched``) mismatched key; ``strict=False`` still raises on
    mismatched keys unless ``skip_mismatched=True`` (they keep the model's values:
    a new head). Nothing is modified when it raises.
    """
    dcp_dir = _dcp_dir(source, step)
    state, where = _read_dcp(dcp_dir) if dcp_dir is not None else _read_source(source, step=step,
                                                                              object_name=object_name)
    model_sd = model.state_dict(keep_vars=True)  # keep_vars: Parameters themselves, so tied ones compare by identity
    renamed_sd, report = _remap(state, where, model_sd, strip_prefixes, key_map, add_prefix)
    subset = _classify(renamed_sd, model_sd, report)
    problems = bool(report.missing or report.unexpected or (report.mismatched and not skip_mismatched))
    if strict and problems:
        raise StateMismatch(_mismatch_message(report, strict=True, skip_mismatched=skip_mismatched))
    if report.mismatched and not skip_mismatched:
        raise StateMismatch(_mismatch_message(report, strict=False, skip_mismatched=False))
    if dcp_dir is not None:  # `subset` holds data-less meta tensors so far: read what matched, into copies
        subset = dcp.read(dcp_dir, state, subset, model_sd)
    # load_state_dict copies into the existing tensors under no_grad and runs the modules' own
    # load hooks (extra state, BatchNorm versions); strict=False because `subset` is partial by design.
    model.load_state_dict(subset, strict=False)
    if log_report:
        log.log(logging.INFO if report.ok else logging.WARNING, "%s", report)
    return report


# ------------------------------------------------------------------- reading
def _dcp_dir(source: str | os.PathLike[str] | Mapping[str, Any], step: int | str | None) -> Path | None:
    if isinstance(source, Mapping) or not isinstance(source, (str, os.PathLike)) or not dcp.is_dcp_dir(Path(source)):
        return None
    if step is not None:
        raise FtrainError(f"load_pretrained(step={step!r}) applies only to ftrain checkpoint directories; "
                          f"{source} is a DCP checkpoint (one step)")
    return Path(source)


def _read_dcp(path: Path) -> tuple[Mapping[str, Any], str]:
    """``({key: meta tensor}, where)``: shapes and dtypes only; :func:`dcp.read` loads the data later."""
    state, skipped = dcp.index(path)
    if skipped:
        log.warning("%s: not reading %d non-tensor entr%s (DCP stores them as pickles): %s", path, len(skipped),
                    "y" if len(skipped) == 1 else "ies", _few(skipped))
    return state, f"{path} (DCP)"


def _read_source(source: str | os.PathLike[str] | Mapping[str, Any], *, step: int | str | None,
                 object_name: str) -> tuple[Mapping[str, Any], str]:
    """``(flat state dict, description of where it came from)``."""
    if isinstance(source, Mapping):
        if step is not None:
            raise FtrainError(f"load_pretrained(step={step!r}) applies only to ftrain checkpoint directories, "
                              "not to an in-memory mapping")
        where = f"<mapping of {len(source)} keys>"
        return _check_keys(source, where), where
    if not isinstance(source, (str, os.PathLike)):
        raise FtrainError(f"load_pretrained: cannot read weights from a {type(source).__name__}; accepted: {ACCEPTED}")
    path = Path(source)
    if path.is_dir():
        return _read_checkpoint(path, step, object_name)
    if step is not None:
        raise FtrainError(f"load_pretrained(step={step!r}) applies only to ftrain checkpoint directories; "
                          f"{path} is not a directory")
    if not path.exists():
        raise FtrainError(f"pretrained weights {str(path)!r} do not exist; accepted: {ACCEPTED}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _check_keys(_read_safetensors(path), str(path)), str(path)
    if suffix in TORCH_SUFFIXES:
        return _unwrap(_read_torch(path), path), str(path)
    raise FtrainError(f"cannot read pretrained weights from {str(path)!r}: unknown format {suffix or '(no suffix)'!r};"
                      f" accepted: {ACCEPTED}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:  # imported here: only fine-tuning from .safetensors needs the package
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise FtrainError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpoint(str(path), f"not a readable safetensors file ({e})") from None
    return _with_aliases(state, metadata.get("ftrain_aliases"), path)


def _with_aliases(state: dict[str, torch.Tensor], recorded: str | None, path: Path) -> dict[str, torch.Tensor]:
    """Give back the names ``ftrain ckpt export`` dropped from a safetensors file (tied weights stored once).

    Its metadata ``ftrain_aliases`` maps each dropped name to the kept one. A tied model would count them as
    loaded anyway (through its shared tensor); an untied model of the same architecture gets the values too,
    as a restore gives them. Metadata that does not fit (another writer's, or edited) is ignored with a warning.
    """
    if recorded is None:
        return state
    try:
        aliases = json.loads(recorded)
    except ValueError:
        aliases = None
    if not (isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) and v in state
                                              and k not in state for k, v in aliases.items())):
        log.warning("%s: ignoring its metadata 'ftrain_aliases' (not a map of dropped names to names in the file)",
                    path)
        return state
    return {**state, **{dropped: state[kept] for dropped, kept in aliases.items()}}


#: torch.load(weights_only=True) could still run code before 2.6 (CVE-2025-32434): refuse .pt files there.
SAFE_TORCH = (2, 6)


def _read_torch(path: Path) -> Any:
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < SAFE_TORCH:
        raise FtrainError(f"refusing to read {path}: torch {torch.__version__} has a weights_only loader that can "
                          "run code (CVE-2025-32434); upgrade to torch>=2.6 or convert the file to safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global outside its allowlist *before* calling it, so nothing ran.
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise CorruptCheckpoint(str(path), "not a readable torch file (weights_only unpickling failed)") from None
        raise FtrainError(
            f"{path} needs code execution to load (it pickles {found.group(1)}), and ftrain loads pickles only with "
            "torch.load(weights_only=True); if you trust it, convert it once to safetensors "
            "(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and load that") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CorruptCheckpoint(str(path), f"not a readable torch file ({e})") from None


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """The state dict inside what ``torch.load`` returned.

    Rule: a dict with a tensor among its values *is* the state dict. Otherwise,
    if exactly one entry holds tensors (at any depth) and its key is one of
    :data:`WRAPPER_KEYS`, that entry is the state dict. Anything else is refused
    rather than guessed (``{"model": ..., "optimizer": ...}`` is ambiguous).
    """
    if not isinstance(obj, Mapping):
        raise FtrainError(f"{path} holds a {type(obj).__name__}, not a state dict; accepted: {ACCEPTED}")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return _check_keys(obj, str(path))
    holders = [k for k, v in obj.items() if _holds_tensor(v)]
    if len(holders) == 1 and holders[0] in WRAPPER_KEYS and isinstance(obj[holders[0]], Mapping):
        return _check_keys(obj[holders[0]], f"{path}[{holders[0]!r}]")
    if not holders:
        raise FtrainError(f"{path} holds no tensors (top-level keys: {_few(list(map(str, obj)))})")
    raise FtrainError(f"{path} holds tensors under {holders}; only a single entry named one of {list(WRAPPER_KEYS)} "
                      "is unwrapped automatically: load it with torch.load(path, weights_only=True) and pass the "
                      "model's entry to load_pretrained as a mapping")


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 8:  # state trees are shallow; stop on pathological nesting rather than recurse forever
        return False
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    return False


def _check_keys(state: Mapping[Any, Any], where: str) -> Mapping[str, Any]:
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise FtrainError(f"{where} is not a state dict: keys must be strings, found {bad[:3]!r}")
    return state


def _read_checkpoint(path: Path, step: int | str | None, object_name: str) -> tuple[Mapping[str, Any], str]:
    which = reader.parse_selector(step) if isinstance(step, str) else step
    store, which = reader.open_path(path, which)
    if not store.step_dirs():
        raise FtrainError(f"{path} is a directory but not an ftrain checkpoint (no step-N directories in it); "
                          f"accepted: {ACCEPTED}")
    manifest, objects = reader.load(store, which, name=object_name, rank=rank_manifests)
    state = objects.get(object_name)
    where = f"{store.path(manifest.step)} [{object_name}]"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} is a {type(state).__name__}, not a state dict: pick another object_name")
    return _check_keys(state, where), where


# ----------------------------------------------------------------- remapping
def _remap(state: Mapping[str, Any], where: str, model_sd: Mapping[str, Any], strip_prefixes: Sequence[str],
           key_map: KeyMap | None, add_prefix: str) -> tuple[dict[str, Any], LoadReport]:
    """Rename the source keys (strip, key_map, add_prefix); refuse two keys landing on one name."""
    if isinstance(strip_prefixes, str):  # a bare string would be iterated per character
        strip_prefixes = (strip_prefixes,)
    stripped = ""
    keys = list(state)
    changed = True
    while changed and keys:
        changed = False
        for prefix in strip_prefixes:
            # Both conditions: a model whose own names start with the prefix must not lose it.
            if prefix and all(k.startswith(prefix) for k in keys) and not any(k.startswith(prefix) for k in model_sd):
                keys = [k[len(prefix):] for k in keys]
                stripped += prefix
                changed = True
    mapper = _mapper(key_map)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    report = LoadReport(source=where, stripped_prefix=stripped)
    for original, key in zip(state, keys, strict=True):
        new = mapper(key) if mapper is not None else key
        if new is None:
            report.dropped.append(original)
            continue
        if not isinstance(new, str):
            raise FtrainError(f"key_map returned {new!r} for {key!r}: expected a str or None")
        new = add_prefix + new
        if new in origin:
            raise FtrainError(f"key remapping sends both {origin[new]!r} and {original!r} of {where} to {new!r}; "
                              "fix key_map so that every key gets its own name")
        origin[new] = original
        out[new] = state[original]
        report.renamed += new != original
    return out, report


def _mapper(key_map: KeyMap | None) -> Callable[[str], str | None] | None:
    if key_map is None or callable(key_map):
        return key_map
    if not isinstance(key_map, Mapping):
        raise FtrainError(f"key_map must be a mapping of key prefixes or a callable, not a {type(key_map).__name__}")
    bad = [(k, v) for k, v in key_map.items() if not isinstance(k, str) or not (v is None or isinstance(v, str))]
    if bad:
        raise FtrainError(f"key_map entries must map a str prefix to a str (or None to drop): {bad[:3]!r}")
    # Longest prefix first, so {"enc.": ..., "enc.head.": ...} routes the head by its own rule.
    prefixes = sorted(key_map, key=len, reverse=True)

    def apply(key: str) -> str | None:
        for prefix in prefixes:
            if key.startswith(prefix):
                target = key_map[prefix]
                return None if target is None else target + key[len(prefix):]
        return key

    return apply


# ------------------------------------------------------------ classification
def _classify(state: Mapping[str, Any], model_sd: Mapping[str, Any], report: LoadReport) -> dict[str, Any]:
    """Fill in the report's key lists; return the subset of ``state`` that can be loaded as is."""
    subset: dict[str, Any] = {}
    for key, want in model_sd.items():
        if key not in state:
            continue
        have = state[key]
        if not isinstance(want, torch.Tensor):  # extra state: the module's set_extra_state judges it
            subset[key] = have
            report.loaded.append(key)
            continue
        if not isinstance(have, torch.Tensor):
            report.mismatched.append((key, None, tuple(want.shape)))
            continue
        if have.shape != want.shape:
            report.mismatched.append((key, tuple(have.shape), tuple(want.shape)))
            continue
        if have.dtype != want.dtype:
            report.cast.append((key, have.dtype, want.dtype))
        subset[key] = have
        report.loaded.append(key)
    report.unexpected = [k for k in state if k not in model_sd]
    loaded_ids = {id(model_sd[k]) for k in subset}
    for key, want in model_sd.items():
        if key in state:
            continue
        # A tied weight (decoder = embedding) is stored once by deduplicating savers; it is loaded all the same.
        if isinstance(want, torch.Tensor) and id(want) in loaded_ids:
            report.tied.append(key)
        else:
            report.missing.append(key)
    return subset


def _mismatch_message(report: LoadReport, *, strict: bool, skip_mismatched: bool) -> str:
    parts = []
    if strict:
        parts += [f"{len(report.missing)} missing ({_few(report.missing)})" if report.missing else "",
                  f"{len(report.unexpected)} unexpected ({_few(report.unexpected)})" if report.unexpected else ""]
    shapes = [f"{k} source {_fmt_shape(s)} vs model {_fmt_shape(m)}" for k, s, m in report.mismatched]
    parts.append(f"{len(shapes)} mismatched ({_few(shapes)})" if shapes and not skip_mismatched else "")
    summary = "; ".join(p for p in parts if p)
    fix = ("pass strict=False to load what matches, skip_mismatched=True to keep the model's values for "
           "mismatched keys, or key_map/add_prefix to rename keys" if strict else
           "pass skip_mismatched=True to keep the model's values for them (e.g. a new head), or key_map to rename")
    mode = "strict=True" if strict else "strict=False"
    return f"load_pretrained({mode}) from {report.source}: {summary}; model unchanged; {fix}"


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... and {len(items) - n} more" if len(items) > n else "")


def _fmt_shape(shape: Shape | None) -> str:
    return "(not a tensor)" if shape is None else str(list(shape))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
