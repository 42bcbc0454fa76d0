"""Shared by the ``ftrain ckpt`` commands: opening a checkpoint path, warnings on stderr, and printing values
read from files (which may be hostile: every shape is checked, names are escaped, nesting is capped)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ftrain.errors import CheckpointError, UsageError, printable

if TYPE_CHECKING:
    from ftrain.checkpoint.store import CheckpointStore

STEP_HELP = "a step number, 'latest' (default: newest intact) or 'best' (best monitored metric)"
_MAX_DEPTH = 32  # meta nested deeper than this is shown as "..." (a hostile manifest must not blow the stack)


def open_checkpoint(path: str, step: str) -> tuple[CheckpointStore, int | str]:
    from ftrain.checkpoint import reader
    from ftrain.checkpoint.remote import is_url

    # exit 2 like `ckpt ls`: a mistyped path is bad input, not a damaged checkpoint (a URL: the remote tier)
    if not is_url(path) and not os.path.isdir(path):
        raise UsageError(f"checkpoint dir {path!r} does not exist or is not a directory")
    try:
        which = reader.parse_selector(step)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    return reader.open_path(path, which)


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """ftrain's warnings ("skipping checkpoint step N") as ``ftrain: warning:`` lines on stderr.

    Nothing configures logging in ``ftrain ckpt``: Python's last-resort handler would
    print them bare, or not at all once a host (a test runner) configures the root logger.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_SafeFormatter("ftrain: warning: %(message)s"))
    logger = logging.getLogger("ftrain")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _SafeFormatter(logging.Formatter):
    """Warnings quote checkpoint contents (paths, reasons, names): sanitised as a whole, one line each.

    CorruptCheckpoint already sanitises its path and reason; this also covers
    any other warning logged while a command reads a hostile directory.
    """

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


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


def get_dict(meta: dict[str, Any], key: str) -> dict[str, Any]:
    v = meta.get(key)
    return v if isinstance(v, dict) else {}


def counts(v: Any) -> Any:
    """{object: [names]} as {object: count}; any other shape as sanitised JSON."""
    if isinstance(v, dict) and all(isinstance(x, list) for x in v.values()):
        return {str(k): len(x) for k, x in v.items()}
    return jsonable(v)


def counts_text(v: Any, what: str) -> str:
    if isinstance(v, dict) and all(isinstance(x, int) for x in v.values()):
        return ", ".join(f"{safe(k)}: {n} {what}" for k, n in sorted(v.items())) or "none"
    return raw(v)


def names(v: Any) -> str:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return ", ".join(safe(x) for x in v) or "-"
    return raw(v)


def num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if v in ("nan", "inf", "-inf"):
        return str(v)
    return json.dumps(v)


def raw(v: Any) -> str:
    text = json.dumps(v)
    return f"{text[:200]}{'...' if len(text) > 200 else ''} (unexpected shape)"


def safe(s: Any) -> str:
    """A name or value from a file, printable: no terminal escape sequences or line breaks reach the screen.

    Non-printable characters become their escapes (``\\x1b``), see :func:`ftrain.errors.printable`.
    """
    return printable(s)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
