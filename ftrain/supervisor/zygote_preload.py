"""What the zygote imports before it forks, and the checks that it is still fit to fork (issue 23).

A module is fit to preload when importing it leaves the process with one thread and CUDA uninitialized: a fork
copies only the calling thread (another thread's locks would stay held forever in the child), and a CUDA context
does not survive a fork. The zygote checks both after every import, and again before every fork.
Besides ``supervisor.preload``, the script's own top-level imports are preloaded where that is safe: absolute
imports of modules found outside the script's directory (a module beside the script is the user's code, which
may change between restarts; the worker imports it fresh).
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Environment variables read once, when an interpreter or a library starts: a worker forked from a zygote that
#: saw other values would differ from a fresh one, so such a request is answered Cold (by name, values unsaid).
STARTUP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
               "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONFAULTHANDLER", "PYTHONMALLOC",
               "PYTHONTRACEMALLOC", "PYTHONDONTWRITEBYTECODE", "PYTHONOPTIMIZE", "PYTHONWARNINGS", "PYTHONDEVMODE",
               "PYTHONINTMAXSTRDIGITS", "LANG", "LC_ALL", "LC_CTYPE", "LD_PRELOAD", "LD_LIBRARY_PATH",
               "TORCH_LOGS", "TORCH_CPP_LOG_LEVEL")
#: ...and every variable with one of these prefixes (OpenMP, MKL and OpenBLAS size their thread pools at load).
STARTUP_ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "GOTO_")


def threads() -> int:
    """This process's threads, native ones included (OpenBLAS's pool is invisible to ``threading``)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def cuda_initialized() -> bool | None:
    """``torch.cuda.is_initialized()`` if torch is imported (the call itself initializes nothing), else None."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "cuda"):
        return None
    return bool(torch.cuda.is_initialized())


def script_imports(script: str) -> list[tuple[str, tuple[str, ...]]]:
    """The absolute imports at the top level of ``script`` (inside top-level ``try`` blocks too), in order:
    ``(module, names)`` with ``names`` those of ``from module import names``."""
    try:
        tree = ast.parse(Path(script).read_bytes(), script)
    except (OSError, SyntaxError, ValueError):
        return []  # the worker reports it when it runs the script
    found: list[tuple[str, tuple[str, ...]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((a.name, ()) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module not in (None, "__future__"):
                found.append((str(node.module), tuple(a.name for a in node.names if a.name != "*")))
            elif isinstance(node, ast.Try):  # try: import fast_thing / except ImportError: ...
                visit(node.body)

    visit(tree.body)
    return found


@dataclass
class Preloaded:
    """The zygote's state after preloading (fixed from then on)."""

    modules: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why"
    reason: str = ""  # why every request is answered Cold; empty when warm
    handlers: dict[int, Any] = field(default_factory=dict)
    fds: dict[int, tuple[int, int]] = field(default_factory=dict)  # fd -> (st_dev, st_ino) left by the imports
    sys_path: list[str] = field(default_factory=list)


def preload(names: Sequence[str], script: str | None) -> Preloaded:
    """Import ``names``, then the script's safe top-level imports; stop at the first that leaves a second thread
    or CUDA initialized (the result then carries the reason)."""
    out = Preloaded()
    # `python -m` put the zygote's cwd first on sys.path: no place to import from (a worker gets its script's).
    out.sys_path = list(sys.path) if getattr(sys.flags, "safe_path", False) else sys.path[1:]  # -P: 3.11+
    sys.path[:] = out.sys_path
    # "-name": never preload name or its submodules, not even as the script's import (a module that reads the
    # rank's environment at import would see the zygote's).
    never = tuple(n[1:] for n in names if n.startswith("-"))
    plan: list[tuple[str, tuple[str, ...]]] = [(n, ()) for n in names if not n.startswith("-")]
    if script:
        home = os.path.dirname(os.path.realpath(script))
        for name, attrs in script_imports(script):
            why = "excluded by supervisor.preload" if _within(name, never) else _not_preloadable(name, home)
            if why:
                out.skipped.append(f"{name}: {why}")
            elif name not in names:
                plan.append((name, attrs))
    for name, attrs in plan:
        try:
            module = importlib.import_module(name)
            for attr in attrs:  # `from m import x` may import m.x, or run m's lazy __getattr__
                if not hasattr(module, attr):
                    with contextlib.suppress(ImportError):
                        importlib.import_module(f"{name}.{attr}")
        except Exception as e:  # a module that fails to import is the worker's to report, not the zygote's
            out.skipped.append(f"{name}: {type(e).__name__}: {e}".splitlines()[0])
            continue
        out.modules.append(name)
        n = threads()
        if n > 1:
            hint = "" if os.environ.get("OMP_NUM_THREADS") == "1" else " (OpenBLAS starts one unless OMP_NUM_THREADS=1)"
            out.reason = f"importing {name} started a thread ({n} threads){hint}"
            break
        if cuda_initialized():
            out.reason = f"importing {name} initialized CUDA"
            break
    out.handlers = {int(s): h for s in signal.valid_signals() if (h := signal.getsignal(s)) is not None}
    out.fds = open_fds()
    return out


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _not_preloadable(name: str, home: str) -> str:
    try:
        spec = importlib.util.find_spec(name.partition(".")[0])
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if spec is None:
        return "not found outside the script's directory"
    origin = spec.origin or next(iter(spec.submodule_search_locations or ()), "")  # a namespace package: a dir
    if origin and os.path.realpath(origin).startswith(home + os.sep):
        return "the script's own module (it may change between restarts)"
    return ""


def open_fds() -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        if fd > 2:
            try:
                st = os.fstat(fd)  # the listing's own descriptor is closed by now: not kept
            except OSError:
                continue
            out[fd] = (st.st_dev, st.st_ino)
    return out


def env_mismatch(zygote: Mapping[str, str], worker: Mapping[str, str]) -> list[str]:
    """Names of the start-up variables (:data:`STARTUP_ENV`) whose values differ between the two environments."""
    names = {*STARTUP_ENV, *(k for env in (zygote, worker) for k in env if k.startswith(STARTUP_ENV_PREFIXES))}
    return sorted(n for n in names if zygote.get(n) != worker.get(n))
