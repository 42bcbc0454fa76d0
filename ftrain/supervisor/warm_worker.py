"""What a warm worker does between the zygote's fork and the user's script, and after it.

Runs in the child the zygote forked for one entry process (docs/FORMAT.md, "Warm starts (zygote)"), inside the
zygote's interpreter, torch already imported. Its job: leave the process as ``python [-u] SCRIPT ARGS`` started
by torchrun in place of the entry would be, then run the script as ``__main__``:

* a session of its own (torchrun starts each worker with ``start_new_session=True``), so ``killpg`` on the
  worker's pid reaches it and its children, as torchrun's ``killpg`` reaches a cold worker's group;
* the entry's stdio descriptors on 0/1/2 and ``sys.stdin``/``stdout``/``stderr`` built as the interpreter builds
  them at start (buffering from ``-u``/``PYTHONUNBUFFERED``, line buffering on a tty and for stderr);
* the entry's cwd, environment (plus ``FTRAIN_ENTRY_PID``/``FTRAIN_FORKED_PID``), umask and CPU affinity;
* signal dispositions as a fresh interpreter has them after importing the preloaded modules, with the signals
  the entry inherited as ignored still ignored, and the entry's signal mask;
* fresh random state: ``random``, NumPy's legacy global generator and torch's default CPU generator reseeded from
  the OS (a fresh torch seeds that generator non-deterministically), and a new multiprocessing auth key;
* ``sys.argv``, ``sys.orig_argv``, ``sys.path[0]`` and the ``__main__`` module as the interpreter sets them.

Never returns into the zygote's loop: :func:`run` returns the exit status, which the zygote's ``main`` hands to
``sys.exit`` at top level, so the interpreter's own finalization (non-daemon threads joined, ``atexit`` handlers
run, modules torn down, stdio flushed; exit code 120 if that fails) ends a warm worker as it ends a cold one.
Known differences from a cold worker: ``os.getppid()`` is the zygote; the string hash secret is the zygote's
(unless ``PYTHONHASHSEED`` is set); modules the zygote preloaded are not re-imported, so their import-time
warnings are not printed again and an upgrade of an installed package is seen only by a new zygote.
"""
from __future__ import annotations

import atexit
import builtins
import importlib
import importlib.machinery
import io
import os
import random
import runpy
import signal
import sys
import threading
import traceback
import types
from dataclasses import dataclass
from typing import Any

from ftrain import envvars
from ftrain.supervisor.pdeath import die_with_parent
from ftrain.supervisor.zygote_protocol import SpawnRequest

#: The module torchrun runs as under ftrain launch (``agent.MODULE``: torchrun, deaf to preemption signals). Spelled
#: out, not imported: runpy runs that module as __main__ in this process, and warns if it was imported before.
TORCHRUN_MODULE = "ftrain.supervisor.agent"


@dataclass
class Spawn:
    """Everything the child needs, handed over by the zygote's loop right after the fork."""

    request: SpawnRequest
    fds: list[int]  # the entry's stdio descriptors, in ``request.stdio`` order
    entry: int  # the entry's pid (the socket's peer credentials)
    #: Signal dispositions right after preloading, before the zygote installed its own handlers.
    handlers: dict[int, Any]
    #: ``sys.path`` without its first entry: the script's directory goes there (the cwd for ``-m``).
    sys_path: list[str]
    #: The zygote's pid: the child dies with it.
    zygote: int


def run(spawn: Spawn) -> int | str | None:
    """Become the worker, run its script; the status for ``sys.exit`` (what SystemExit carried, else 0 or 1)."""
    try:
        _become(spawn)
    except Exception as e:  # the entry already has a pid: fail as that worker, saying why (on its stderr if set)
        print(f"ftrain: the warm worker could not be set up: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        _execute(spawn.request)
    except SystemExit as e:
        return e.code
    except BaseException as e:  # the interpreter's own handling of an uncaught exception, below
        _report_uncaught(e)
        if isinstance(e, KeyboardInterrupt):
            _exit_by_sigint()
        return 1
    return 0


def _become(spawn: Spawn) -> None:
    req = spawn.request
    os.setsid()  # first: until then the entry's killpg(worker) falls back to kill(worker)
    if req.module and req.target == TORCHRUN_MODULE:
        # torchrun dies with the zygote, which dies with the supervisor: with its unlimited restarts, a torchrun
        # orphaned by a SIGKILLed supervisor would start its workers again forever. (A rank's worker outlives the
        # zygote instead: it notices its launcher is gone, saves and exits.)
        die_with_parent(spawn.zygote)
    _restore_signals(spawn.handlers, set(req.ignored_signals))
    _adopt_stdio(req.stdio, spawn.fds)
    os.chdir(req.cwd)
    os.environ.clear()
    os.environ.update(req.env)
    os.environ[envvars.ENTRY_PID] = str(spawn.entry)
    os.environ[envvars.FORKED_PID] = str(os.getpid())
    os.umask(req.umask)
    if req.affinity and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, req.affinity)
        except OSError:
            pass  # CPUs the zygote may not use: keep its set
    _build_stdio(req.unbuffered)
    _reseed()
    sys.orig_argv[:] = req.orig_argv
    if req.module:
        sys.argv[:] = ["-m", *req.args]  # as the interpreter has it while it looks the module up
        path0 = os.getcwd()
    else:
        sys.argv[:] = [req.target, *req.args]
        path0 = os.path.dirname(os.path.realpath(req.target))
    sys.path[:] = spawn.sys_path if getattr(sys.flags, "safe_path", False) else [path0, *spawn.sys_path]
    importlib.invalidate_caches()  # the script's directory may have changed since the zygote last looked
    signal.pthread_sigmask(signal.SIG_SETMASK, req.blocked_signals)  # the zygote forked with all blocked


def _restore_signals(handlers: dict[int, Any], ignored: set[int]) -> None:
    """The dispositions a fresh interpreter would have: the preloaded modules' handlers, Python's defaults
    (SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ ignored), and the entry's inherited ignores, which a
    fresh interpreter keeps (it installs its SIGINT handler only where SIGINT is not ignored)."""
    signal.set_wakeup_fd(-1)
    for sig, handler in handlers.items():
        if sig in ignored and (handler == signal.SIG_DFL or handler is signal.default_int_handler):
            handler = signal.SIG_IGN
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError, TypeError):
            pass  # SIGKILL, SIGSTOP


def _adopt_stdio(present: list[bool], fds: list[int]) -> None:
    received = iter(fds)
    for target, there in enumerate(present):
        if there:
            fd = next(received)
            os.dup2(fd, target)  # inheritable, as fds 0-2 are
            os.close(fd)
        else:
            try:
                os.close(target)  # closed in the entry: closed here too (sys.stdout is then None)
            except OSError:
                pass


def _build_stdio(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr as CPython's create_stdio() builds them at start-up (Python/pylifecycle.c)."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        old = getattr(sys, f"__{name}__", None)
        encoding = getattr(old, "encoding", None) or "utf-8"  # same locale and PYTHONIOENCODING as the zygote
        errors = getattr(old, "errors", None) or ("backslashreplace" if fd == 2 else "strict")
        stream = _open_stdio(fd, name, encoding, errors, unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _open_stdio(fd: int, name: str, encoding: str, errors: str, unbuffered: bool) -> io.TextIOWrapper | None:
    write = fd != 0
    try:
        os.fstat(fd)
        raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
    except OSError:
        return None  # as the interpreter does for a closed descriptor
    buffered = not unbuffered
    buf: Any = raw if write and not buffered else (io.BufferedWriter(raw) if write else io.BufferedReader(raw))
    raw.name = f"<{name}>"  # FileIO.name is writable; CPython sets it so
    line_buffering = buffered and (raw.isatty() or fd == 2)
    stream = io.TextIOWrapper(buf, encoding=encoding, errors=errors, newline="\n", line_buffering=line_buffering,
                              write_through=not buffered)
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream


def _reseed() -> None:
    """Fresh entropy where a fresh process would have it; torch's CUDA generators are left alone (they seed at
    CUDA initialization, which only ever happens after the fork)."""
    random.seed()  # random also reseeds itself at fork (os.register_at_fork); cheap either way
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()  # NumPy's legacy global RandomState, from OS entropy
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "default_generator"):
        torch.default_generator.seed()  # non-deterministic, as torch seeds it at start-up
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None:
        mp_process.current_process().authkey = os.urandom(32)


def _execute(req: SpawnRequest) -> None:
    if req.module:
        # What `python -m MODULE` runs (runpy's private entry point for -m): argv[0] becomes the module's file and
        # __main__ is replaced for good, not for the duration of the call as runpy.run_module does.
        runpy._run_module_as_main(req.target, alter_argv=True)  # type: ignore[attr-defined]
        return
    # As the interpreter makes it absolute (_Py_abspath): joined to the cwd, not normalized ("sub/../x.py" stays).
    path = req.target if os.path.isabs(req.target) else os.path.join(os.getcwd(), req.target)
    if not os.path.exists(path):
        prog = sys.orig_argv[0] if sys.orig_argv else sys.executable
        print(f"{prog}: can't open file {path!r}: [Errno 2] {os.strerror(2)}", file=sys.stderr)
        raise SystemExit(2)  # the interpreter's own message and status
    if os.path.isdir(path) or not path.endswith(".py"):
        runpy.run_path(req.target, run_name="__main__")  # a directory, a zip, a .pyc: runpy knows them
        return
    with open(path, "rb") as f:
        source = f.read()
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    # dont_inherit: this module's `from __future__ import annotations` must not leak into the script.
    code = compile(source, path, "exec", dont_inherit=True)
    exec(code, main.__dict__)


def _report_uncaught(exc: BaseException) -> None:
    """What the interpreter does with an exception that reaches the top: record it in sys.last_* (ftrain's exit
    hook reads them: ftrain/session/teardown.py) and hand it to sys.excepthook, minus this module's frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    exc.__traceback__ = tb
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    try:
        sys.excepthook(type(exc), exc, tb)
    except BaseException as hook_error:  # as the interpreter reports a failing hook
        print("Error in sys.excepthook:", file=sys.stderr)
        traceback.print_exception(type(hook_error), hook_error, hook_error.__traceback__)
        print("\nOriginal exception was:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, tb)


def _exit_by_sigint() -> None:
    """An uncaught KeyboardInterrupt ends the interpreter by SIGINT (so a shell sees it), after finalizing."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as finalization does
    except BaseException:
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signal.SIGINT)
