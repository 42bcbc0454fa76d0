"""The zygote: a forkserver that imports torch once per launch and forks warm workers for torchrun's ranks.

Supervisor side: :class:`Zygote` starts and stops it. The process itself
(``python -m ftrain.supervisor.zygote --socket PATH --preload a,b [--script S]``):

1. listens on its Unix socket (bound by :meth:`Zygote.start`) before anything else, so entry processes that
   start meanwhile queue in the backlog;
2. imports the ``--preload`` modules, then the script's own top-level imports where that is safe (an absolute
   import found outside the script's directory); after each import it checks that it still has one thread and
   that CUDA is not initialized. If not, it stays up but answers every request :class:`Cold`, naming the module;
3. serves requests one at a time, in one thread (a poll loop; SIGCHLD and stop signals arrive through
   ``signal.set_wakeup_fd``): for a :class:`SpawnRequest` it forks, and the child becomes the worker
   (``warm_worker.run``); it tells the entry the worker's pid, then its exit status; an entry whose connection
   closes first (it was killed) gets its worker's process group SIGKILLed;
4. on SIGTERM, SIGINT or SIGHUP, SIGKILLs every worker's process group, reaps them and exits; it dies with the
   supervisor (PR_SET_PDEATHSIG, set by :meth:`Zygote.start`).

It never runs a torch op and never initializes CUDA; it forks only with one thread and all signals blocked.
The protocol and the workers file are specified in docs/FORMAT.md, "Warm starts (zygote)".
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from ftrain import envvars
from ftrain.supervisor import warm_worker
from ftrain.supervisor import zygote_protocol as wire
from ftrain.supervisor.pdeath import become_subreaper, die_with_parent
from ftrain.supervisor.zygote_preload import Preloaded, cuda_initialized, env_mismatch, open_fds, preload, threads

#: How long a connected peer may take to send its request.
REQUEST_TIMEOUT = 10.0
#: Ignored by the zygote (see Server.__init__): a stop sent to every process must reach the workers, not it.
_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _say(msg: str) -> None:
    print(f"ftrain zygote[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Client:
    sock: socket.socket | None  # None once the entry closed its end
    entry: int
    worker: int
    started: float


class Server:
    """The zygote's request loop. One thread; see the module docstring for the contract."""

    def __init__(self, listener: socket.socket, state: Preloaded, table: Path, env: Mapping[str, str]) -> None:
        self.listener, self.state, self.table = listener, state, table
        self.env = dict(env)  # as the zygote started: the imports may have set variables since
        self.interpreter = wire.Interpreter.current()
        self.clients: dict[int, _Client] = {}  # by worker pid
        self.by_fd: dict[int, _Client] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        listener.setblocking(False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # the wakeup byte is what matters
        for sig in _IGNORED_SIGNALS:
            # Ignored: a stop sent to every process at once (systemd's control-group kill, a node shutdown, the
            # scheduler's signal to the job's cgroup) must leave the workers to save their final checkpoint, as a
            # cold worker's torchrun does; the zygote is stopped by its supervisor (Zygote.stop: SIGKILL).
            signal.signal(sig, signal.SIG_IGN)
        self.poller = select.poll()  # not epoll: no descriptor of its own for a child to inherit
        self.poller.register(listener, select.POLLIN)
        self.poller.register(self._wake_r, select.POLLIN)
        self._write_table()

    def serve(self) -> warm_worker.Spawn | None:
        """Serve until killed, or, in a forked child, return what the worker needs."""
        while True:
            for fd, _ in self.poller.poll(1000):  # the timeout only guards against a lost wakeup byte
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif fd == self.listener.fileno():
                    spawn = self._accept()
                    if spawn is not None:
                        return spawn  # the child
                elif fd in self.by_fd:
                    self._on_client(self.by_fd[fd])
            self._reap()

    # ------------------------------------------------------------ requests
    def _accept(self) -> warm_worker.Spawn | None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.settimeout(REQUEST_TIMEOUT)
        creds = struct.Struct("3i")
        entry, uid, _ = creds.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
        if uid != os.getuid():
            _say(f"refused a connection from uid {uid}")
            conn.close()
            return None
        try:
            got = wire.recv(conn, (wire.SpawnRequest, wire.StatusRequest), with_fds=True)
        except (wire.ProtocolError, OSError) as e:
            _say(f"bad request from pid {entry}: {e}")
            conn.close()
            return None
        if got is None:
            conn.close()
            return None
        request, fds = got
        if isinstance(request, wire.StatusRequest):
            with contextlib.suppress(OSError):
                wire.send(conn, self.status())
            conn.close()
            return None
        reason = self._refusal(request, fds)
        if reason:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                wire.send(conn, wire.Cold(reason))
            conn.close()
            return None
        return self._fork(conn, entry, request, fds)

    def _refusal(self, req: wire.SpawnRequest, fds: list[int]) -> str:
        """Why ``req`` gets no warm worker ("" if it does)."""
        if req.version != wire.PROTOCOL_VERSION:
            return f"the entry speaks protocol version {req.version}, the zygote {wire.PROTOCOL_VERSION}"
        if self.state.reason:
            return self.state.reason
        if len(fds) != sum(req.stdio) or len(req.stdio) != 3:
            return f"the entry sent {len(fds)} file descriptors for stdio {req.stdio}"
        for name in ("executable", "version", "flags", "warnoptions", "xoptions"):
            if getattr(req.interpreter, name) != getattr(self.interpreter, name):
                return f"the entry's interpreter differs from the zygote's ({name})"
        differ = env_mismatch(self.env, req.env)
        if differ:
            return f"the environment differs from the zygote's in variables read at start-up: {', '.join(differ)}"
        n = threads()
        if n > 1:
            return f"the zygote has {n} threads"
        if cuda_initialized():
            return "CUDA is initialized in the zygote"
        return ""

    def _fork(self, conn: socket.socket, entry: int, req: wire.SpawnRequest,
              fds: list[int]) -> warm_worker.Spawn | None:
        if _peer_gone(conn):  # it gave up waiting (the zygote was still preloading): nobody to fork for
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        for stream in (sys.stdout, sys.stderr):  # a child must not write the zygote's buffered output again
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        # All signals blocked across the fork: a signal the entry forwards before the child restored its
        # dispositions stays pending until the child unblocks, instead of reaching the zygote's handlers.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._close_in_child(conn, fds)
            return warm_worker.Spawn(req, fds, entry, self.state.handlers, self.state.sys_path, zygote)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in fds:
            os.close(fd)
        client = _Client(conn, entry, pid, time.time())
        self.clients[pid] = client
        self.by_fd[conn.fileno()] = client
        self.poller.register(conn, select.POLLIN)
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            wire.send(conn, wire.Started(pid))
        except OSError:
            self._drop(client)  # the entry is gone already
        self._write_table()
        return None

    def _close_in_child(self, conn: socket.socket, fds: list[int]) -> None:
        """The zygote's descriptors are none of the worker's business: only what the imports opened stays."""
        signal.set_wakeup_fd(-1)
        for sock in [self.listener, conn, *(c.sock for c in self.clients.values() if c.sock is not None)]:
            sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        keep = self.state.fds
        for fd, ident in open_fds().items():
            if keep.get(fd) != ident and fd not in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _on_client(self, client: _Client) -> None:
        """The entry's end is readable: it closed (it died or exited), or it broke the protocol."""
        assert client.sock is not None
        try:
            data = client.sock.recv(4096)  # readable (poll said so): returns at once
        except OSError:
            data = b""
        if not data:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        """The entry is gone: its worker's process group goes too (as torchrun's killpg takes a cold worker's)."""
        if client.sock is not None:
            self.poller.unregister(client.sock)
            self.by_fd.pop(client.sock.fileno(), None)
            client.sock.close()
            client.sock = None
        if client.worker in self.clients:
            wire.kill_group(client.worker, signal.SIGKILL)

    def _reap(self) -> None:
        while True:
            try:  # WNOWAIT: the zombie keeps its pid, and so its group id, from reuse until the kill below
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            # What the worker left in its group goes with it (cold: torchrun's killpg at teardown, or ftrain
            # launch's kill_tree: nothing outlives an attempt).
            wire.kill_group(pid, signal.SIGKILL, group_only=True)
            _, status = os.waitpid(pid, 0)
            client = self.clients.pop(pid, None)
            if client is None:
                continue
            if client.sock is not None:
                with contextlib.suppress(OSError):
                    wire.send(client.sock, wire.Exited(os.waitstatus_to_exitcode(status)))
                self._drop(client)
            self._write_table()

    # -------------------------------------------------------------- state
    def status(self) -> wire.Status:
        return wire.Status(pid=os.getpid(), state="cold" if self.state.reason else "warm", reason=self.state.reason,
                           preloaded=self.state.modules, skipped=self.state.skipped, threads=threads(),
                           cuda_initialized=cuda_initialized(),
                           workers={str(c.entry): pid for pid, c in self.clients.items()})

    def _write_table(self) -> None:
        record = wire.WorkerTable(wire.PROTOCOL_VERSION, os.getpid(),
                                  {str(c.entry): [pid, c.started] for pid, c in self.clients.items()})
        tmp = self.table.with_name(self.table.name + ".partial")
        tmp.write_text(json.dumps(wire.to_json(record)))
        os.replace(tmp, self.table)


def _peer_gone(conn: socket.socket) -> bool:
    """Whether the peer closed its end (it has nothing more to send while it waits for an answer)."""
    poller = select.poll()  # not recv(MSG_DONTWAIT): on a socket with a timeout Python waits for data anyway
    poller.register(conn, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def table_path(socket_path: str | os.PathLike[str]) -> Path:
    """The workers file of the zygote listening on ``socket_path``."""
    return Path(f"{os.fspath(socket_path)}.workers")


def main(argv: Sequence[str] | None = None) -> int | str | None:
    p = argparse.ArgumentParser(prog="python -m ftrain.supervisor.zygote")
    p.add_argument("--socket", required=True)
    p.add_argument("--fd", type=int, default=None, help="listen on this inherited socket (bound to --socket)")
    p.add_argument("--preload", default="", help="comma-separated modules (supervisor.preload)")
    p.add_argument("--script", default=None, help="also preload this script's top-level imports")
    args = p.parse_args(argv)
    for fd in (0, 1, 2):  # received descriptors must never land on 0-2 (the child dup2s onto them)
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    _reset_inherited_ignores()
    if args.fd is not None:
        listener = socket.socket(fileno=args.fd)
    else:
        listener = listen(args.socket)
    start, env = time.monotonic(), dict(os.environ)
    state = preload([m for m in args.preload.split(",") if m], args.script)
    took = time.monotonic() - start
    state.fds.pop(listener.fileno(), None)
    for line in state.skipped:
        _say(f"not preloaded: {line}")
    _say(f"cold ({state.reason}) after {took:.1f} s" if state.reason
         else f"warm after {took:.1f} s: {', '.join(state.modules) or 'nothing'} preloaded")
    become_subreaper()
    spawn = Server(listener, state, table_path(args.socket), env).serve()
    if spawn is None:
        return 0
    return warm_worker.run(spawn)  # the child: the worker's exit status, for the interpreter's own exit


def listen(path: str | os.PathLike[str]) -> socket.socket:
    """A listening Unix socket at ``path`` (only its owner may connect), replacing a stale one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a zygote SIGKILLed with its supervisor leaves its socket file
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(128)  # entries of a whole node queue here while the zygote preloads
    except OSError:
        sock.close()
        raise
    return sock


def _reset_inherited_ignores() -> None:
    """A fresh interpreter under torchrun inherits no ignored signal from ftrain; the zygote may have (from its
    launcher): forget them, so the dispositions recorded after preloading are a fresh interpreter's."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGPIPE, signal.SIGXFSZ) and signal.getsignal(sig) == signal.SIG_IGN:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)


class Zygote:
    """Supervisor side: one zygote process.

    Call :meth:`start` and :meth:`stop` from the main thread (PR_SET_PDEATHSIG fires when the thread that forked
    the zygote ends); the readers (:meth:`alive`, :meth:`env`, :meth:`status`, :meth:`workers`, :meth:`worker_of`)
    are safe from any thread.
    """

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path

    @classmethod
    def start(cls, socket_path: str | os.PathLike[str], preload: Sequence[str], script: str | None = None, *,
              env: Mapping[str, str] | None = None, stderr: IO[Any] | int | None = None) -> Zygote:
        """Start a zygote listening on ``socket_path`` (at most ~100 bytes; its directory should be private).

        ``env``: the environment torchrun's workers get (OMP_NUM_THREADS included): a request whose start-up
        variables (:data:`STARTUP_ENV`) differ is answered Cold. ``stderr``: where its log lines go (inherited if
        None). Returns at once: the zygote preloads in the background, and entries wait for it.
        """
        path = Path(socket_path)
        # Bound here, so the socket exists when this returns: entries that connect before the zygote has
        # imported anything wait in the backlog instead of starting cold.
        with listen(path) as sock:
            cmd = [sys.executable, "-m", "ftrain.supervisor.zygote", "--socket", str(path), "--fd",
                   str(sock.fileno()), "--preload", ",".join(preload)]
            if script:
                cmd += ["--script", script]
            proc = subprocess.Popen(cmd, env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                                    stdout=stderr, stderr=stderr, start_new_session=True, pass_fds=[sock.fileno()],
                                    preexec_fn=functools.partial(die_with_parent, os.getpid()))
        return cls(proc, path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """What torchrun's environment needs for its entry processes to find this zygote."""
        return {envvars.ZYGOTE_SOCKET: str(self.socket_path)}

    def status(self, timeout: float = 60.0) -> wire.Status:
        """Ask the zygote (waits until it has preloaded). Raises OSError or ProtocolError if it cannot answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            wire.send(s, wire.StatusRequest(wire.PROTOCOL_VERSION))
            got = wire.recv(s, (wire.Status,))
        if got is None:
            raise wire.ProtocolError("the zygote closed the connection without an answer")
        return got[0]

    def workers(self) -> dict[int, int]:
        """Running warm workers, entry pid -> worker pid, from the zygote's workers file (empty if unreadable)."""
        table = self._table()
        return {int(e): int(w[0]) for e, w in table.workers.items()} if table else {}

    def worker_of(self, entry_pid: int) -> int | None:
        """The real worker behind the entry process ``entry_pid`` (one of torchrun's children), if any."""
        return self.workers().get(entry_pid)

    def _table(self) -> wire.WorkerTable | None:
        try:
            return wire.from_json(json.loads(table_path(self.socket_path).read_text()), (wire.WorkerTable,))
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the zygote and every worker it forked (SIGKILL); returns once they are gone. Idempotent."""
        table = self._table()
        if self.proc.poll() is None and table is not None:
            # The workers first, so that the zygote reaps them and tells their entries how they ended (killed).
            for worker, started in table.workers.values():
                _kill_if_same(int(worker), started)
            deadline = time.monotonic() + 1.0
            while self.workers() and time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.01)
        adopted: list[psutil.Process] = []
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):  # what it adopted (become_subreaper) goes with it
                adopted = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.kill()  # (it ignores the stop signals: see Server.__init__)
            self.proc.wait()
        for child in adopted:
            with contextlib.suppress(psutil.Error):
                child.kill()
        # Workers a zygote that could not clean up (SIGKILLed) left behind.
        left = [p for worker, started in (table.workers.values() if table else ())
                if (p := _kill_if_same(int(worker), started)) is not None]
        psutil.wait_procs([*left, *adopted], timeout=timeout)
        for path in (self.socket_path, table_path(self.socket_path)):
            with contextlib.suppress(OSError):
                path.unlink()


#: The prefix of the private directory a supervisor makes for its zygote's socket (in the temporary directory:
#: a socket path must be short), and the socket's name in it.
SOCKET_DIR_PREFIX, SOCKET_NAME = "ftrain-zy-", "z.sock"


def sweep_stale(tmp: str | os.PathLike[str], min_age: float = 60.0) -> list[Path]:
    """Remove the socket directories that supervisors SIGKILLed before their cleanup left in ``tmp`` (their
    zygote died with them): ours, older than ``min_age`` seconds, whose socket no longer accepts a connection.
    A live zygote's directory is never touched. Returns the directories removed."""
    removed = []
    for d in Path(tmp).glob(f"{SOCKET_DIR_PREFIX}*"):
        try:
            st = d.lstat()
            if not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid() or time.time() - st.st_mtime < min_age:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(d / SOCKET_NAME))
            continue  # a zygote answers there
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        except OSError:
            continue
    return removed


def _kill_if_same(pid: int, started: float) -> psutil.Process | None:
    """SIGKILL ``pid``'s group if it is still the process forked at ``started`` (not a reused pid: psutil's start
    time may be a second off); the process, to wait for."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < 2.0:
            wire.kill_group(pid, signal.SIGKILL)
            return proc
    except psutil.Error:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
