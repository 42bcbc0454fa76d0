"""The entry process torchrun starts per rank in place of the script (``python -m ftrain.supervisor.entry
[-m] TARGET ARGS...``): it gets the rank a warm worker from the zygote, or starts the script cold.

Torchrun and the supervisor know a rank by this process's pid; the real (warm) worker is the zygote's child,
in a session of its own. So this process stands in for it, both ways (docs/FORMAT.md, "Warm starts (zygote)"):

* it sends the zygote its argv, environment, cwd, stdio descriptors (torchrun's per-rank log files), signal
  state, umask and CPU affinity, and gets the worker's pid back;
* it forwards every signal torchrun or a user may send (:data:`FORWARDED`: stop, preemption...) to the worker's
  process group, as torchrun's ``killpg`` would reach a cold one (the supervisor signals the worker itself,
  ``JobProcess._addressees``: a stop for a rank must not reach its DataLoader processes);
* it exits as the worker did: the same exit code, or killed by the same signal;
* if it is killed (SIGKILL), the zygote sees its connection close and SIGKILLs the worker's group.

If the zygote is unset, unreachable or refuses (it answers "cold" when a preloaded module left a thread or
initialized CUDA, or when this interpreter or its start-up environment differs from the zygote's), it writes
one line ``ftrain: starting cold: <why>`` to stderr and execs ``python [options] [-m] TARGET ARGS...`` in place:
the same pid, so torchrun never notices.

This process must start in milliseconds: standard library only, besides ``envvars`` and the protocol module.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
from typing import NoReturn

from ftrain import envvars
from ftrain.supervisor import zygote_protocol as wire

MODULE = "ftrain.supervisor.entry"
#: Signals passed on to the worker. Not the synchronous faults of this process itself (SIGSEGV...), not SIGPIPE
#: (ignored by Python), not SIGCHLD, and not the stop signals (SIGTSTP...: a stopped entry stops alone).
FORWARDED = tuple(getattr(signal, n) for n in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2",
                                                "SIGALRM", "SIGCONT", "SIGWINCH", "SIGXCPU", "SIGVTALRM",
                                                "SIGPROF", "SIGPWR") if hasattr(signal, n))
#: How long to wait to connect, and for the zygote's answer: it may still be importing torch (seconds, more on
#: a loaded machine), since entries of the first attempt queue while it preloads.
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 120.0
#: Signals whose default action dumps core: the worker already did (if core dumps are on); this process must not.
_CORE_SIGNALS = tuple(getattr(signal, n) for n in ("SIGQUIT", "SIGILL", "SIGABRT", "SIGFPE", "SIGSEGV", "SIGBUS",
                                                    "SIGSYS", "SIGTRAP", "SIGXCPU", "SIGXFSZ") if hasattr(signal, n))


class Entry:
    """One rank's stand-in. Its state is touched by signal handlers, which Python runs in the main thread
    between bytecodes; an int or list assignment there is atomic, which is all this needs."""

    def __init__(self, target: str, module: bool, args: list[str]) -> None:
        self.target, self.module, self.args = target, module, args
        self.options, self.worker_argv = _interpreter_options()
        self.worker: int | None = None
        self.pending: list[int] = []  # signals that came before the worker's pid
        self.installed: list[int] = []

    def run(self) -> NoReturn:
        path = os.environ.get(envvars.ZYGOTE_SOCKET)
        if not path:
            self.cold(f"{envvars.ZYGOTE_SOCKET} is not set")
        if not sys.platform.startswith("linux"):
            self.cold("warm starts need Linux")
        request = self._request()
        self._install_forwarding(set(request.ignored_signals))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(path)
            fds = [fd for fd, there in enumerate(request.stdio) if there]
            wire.send(sock, request, fds)
            sock.settimeout(REPLY_TIMEOUT)
            got = wire.recv(sock, (wire.Started, wire.Cold))
        except TimeoutError:
            self.cold(f"the zygote at {path} did not answer within {REPLY_TIMEOUT:.0f} s", sock)
        except OSError as e:
            self.cold(f"cannot reach the zygote at {path}: {e.strerror or e}", sock)
        except wire.ProtocolError as e:
            self.cold(f"the zygote at {path} answered out of protocol: {e}", sock)
        if got is None:
            self.cold(f"the zygote at {path} closed the connection", sock)
        if isinstance(got[0], wire.Cold):
            self.cold(got[0].reason, sock)
        self.worker = got[0].pid
        while self.pending:
            wire.kill_group(self.worker, self.pending.pop(0))
        self._wait(sock)

    def _request(self) -> wire.SpawnRequest:
        ignored = [int(s) for s in signal.valid_signals()  # inherited as ignored (Python itself ignores these two)
                   if s not in (signal.SIGPIPE, signal.SIGXFSZ) and signal.getsignal(s) == signal.SIG_IGN]
        umask = os.umask(0)
        os.umask(umask)
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return wire.SpawnRequest(
            version=wire.PROTOCOL_VERSION, target=self.target, module=self.module, args=self.args,
            env=dict(os.environ), cwd=os.getcwd(), stdio=[_is_open(fd) for fd in (0, 1, 2)],
            unbuffered=_unbuffered(self.options), ignored_signals=ignored,
            blocked_signals=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            umask=umask, affinity=affinity, orig_argv=self.worker_argv, interpreter=wire.Interpreter.current())

    def _install_forwarding(self, ignored: set[int]) -> None:
        for sig in FORWARDED:
            if sig not in ignored:  # ignored here, ignored in the worker too: nothing to pass on
                signal.signal(sig, self._forward)
                self.installed.append(sig)

    def _forward(self, signum: int, frame: object) -> None:
        if self.worker is None:
            self.pending.append(signum)
        else:
            wire.kill_group(self.worker, signum)

    def _wait(self, sock: socket.socket) -> NoReturn:
        """Until the zygote reports the worker's exit; then leave the same way."""
        assert self.worker is not None
        try:
            pidfd: int | None = os.pidfd_open(self.worker)  # to outlive a dead zygote, below
        except (OSError, AttributeError):
            pidfd = None  # gone already (the zygote reports it), or no pidfd on this kernel
        sock.settimeout(None)
        try:
            got = wire.recv(sock, (wire.Exited,))
        except (OSError, wire.ProtocolError):
            got = None
        if got is not None:
            _exit_like(got[0].returncode)
        # The zygote died (with the supervisor: it also took torchrun). The worker lives on: a worker under
        # ftrain.Session sees its parent gone and saves a final checkpoint, as a cold one does when torchrun dies.
        _say(f"the zygote died; waiting for worker {self.worker} to exit (its exit status will be unknown)")
        while True:
            if pidfd is not None:
                if select.select([pidfd], [], [], 1.0)[0]:
                    break
            else:
                try:
                    os.kill(self.worker, 0)
                except ProcessLookupError:
                    break
                select.select([], [], [], 0.5)
        _exit_like(1)

    def cold(self, why: str, sock: socket.socket | None = None) -> NoReturn:
        """Become ``python [options] [-m] TARGET ARGS`` in place (same pid), after one line saying why."""
        _say(f"starting cold: {why}")
        if sock is not None:
            sock.close()
        for sig in self.installed:
            signal.signal(sig, signal.SIG_DFL)
        for sig in self.pending:  # what would have reached a cold worker in its first instant
            os.kill(os.getpid(), sig)
        cmd = [sys.executable, *self.options, *(["-m"] if self.module else []), self.target, *self.args]
        try:
            os.execv(sys.executable, cmd)
        except OSError as e:
            _say(f"cannot exec {sys.executable}: {e.strerror}")
            os._exit(127)


def _say(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(f"ftrain: {msg}\n")
        sys.stderr.flush()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _interpreter_options() -> tuple[list[str], list[str]]:
    """This interpreter's own options (``-u`` from torchrun...), and sys.orig_argv as a cold worker would have it:
    the same, without ``-m ftrain.supervisor.entry``."""
    orig = list(sys.orig_argv)
    for i, tok in enumerate(orig[1:], 1):
        if tok == "-m" and orig[i + 1:i + 2] == [MODULE]:
            return orig[1:i], [orig[0], *orig[1:i], *orig[i + 2:]]
        if tok == "-m" + MODULE:
            return orig[1:i], [orig[0], *orig[1:i], *orig[i + 1:]]
    return [], [sys.executable, *sys.argv[1:]]  # started some other way (as a file): no options to keep


def _unbuffered(options: list[str]) -> bool:
    """Whether this interpreter runs unbuffered (``-u``, or PYTHONUNBUFFERED unless -E/-I): the worker's
    sys.stdout and sys.stderr are built to match."""
    if os.environ.get("PYTHONUNBUFFERED") and not sys.flags.ignore_environment:
        return True
    skip = False
    for tok in options:
        if skip or tok.startswith("--") or not tok.startswith("-"):
            skip = tok == "--check-hash-based-pycs"  # the one long option that takes a separate argument
            continue
        for i, ch in enumerate(tok[1:]):
            if ch == "u":
                return True
            if ch in "WXcm":  # the rest of the token, or the next one, is this option's argument
                skip = i == len(tok) - 2
                break
    return False


def _exit_like(returncode: int) -> NoReturn:
    """Exit with ``returncode``, or (negative) die of that signal, so torchrun sees what the worker did."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    if returncode >= 0:
        os._exit(returncode)
    sig = -returncode
    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no disposition to set
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    if sig in _CORE_SIGNALS:
        import resource  # only on this path: every import costs the entry's start

        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with contextlib.suppress(OSError, ValueError):
        os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is to be ignored (SIGWINCH...): as a shell would report it


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    module = bool(argv) and argv[0] == "-m"
    if module:
        argv = argv[1:]
    if not argv:
        _say(f"usage: python -m {MODULE} [-m] TARGET [ARGS...]")
        os._exit(2)
    Entry(argv[0], module, argv[1:]).run()


if __name__ == "__main__":
    main()
