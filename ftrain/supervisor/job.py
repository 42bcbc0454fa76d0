"""One attempt's job: the :class:`Job` interface the supervisor drives, and :class:`JobProcess`, the real one.

:class:`JobProcess` is the job's process tree: one torchrun child, its worker
processes, and their children. Responsibilities: start torchrun so that it
cannot outlive the supervisor, pump its output to the console and the attempt
log, find the worker processes, deliver signals to them, and tear the whole
tree down (signal, wait, SIGKILL, ignoring processes already gone), as
torchelastic does.

The supervisor sees only :class:`Job` and gets jobs from a :class:`JobFactory`
(``JobProcess`` itself by default), so its loop can be driven by a scripted job
in tests, without processes.
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from ftrain.supervisor.entry import MODULE as ENTRY_MODULE
from ftrain.supervisor.pdeath import die_with_parent

log = logging.getLogger("ftrain.launch")

class Job(Protocol):
    """What the supervisor's loop needs of one attempt's job.

    Contract: ``poll()`` is None while the job runs and its exit code (negative: killed by that
    signal) once it has ended, and stays that code. ``kill_tree()`` returns only when the job has
    ended (so ``poll()`` is then not None) and is harmless on a job that already ended; the
    supervisor calls it after every attempt, because workers may outlive torchrun. ``close()`` is
    called once, last.
    """

    @property
    def pid(self) -> int:
        """The job's top process (torchrun), for messages."""
        ...

    @property
    def tail(self) -> Sequence[str]:
        """The job's most recent output lines, oldest first, without newlines (for the root cause)."""
        ...

    def poll(self) -> int | None:
        """None while running, else the exit code."""
        ...

    def signal_workers(self, sig: int) -> int:
        """Send ``sig`` to every worker (rank) process; how many were signalled."""
        ...

    def worker_pids(self) -> frozenset[int]:
        """The pids of the worker (rank) processes running now: torchrun's current worker group."""
        ...

    def signal_new_workers(self, sig: int) -> int:
        """Send the preemption signal ``sig`` to every worker not yet sent it this way; how many were signalled now.

        The supervisor calls it at every poll while stopping, so workers that start after the stop get it
        too. A worker that does not handle ``sig`` yet is left for a later call: the signal's default action
        would kill it before it could save.
        """
        ...

    def kill_tree(self, *, graceful: float = 0.0) -> None:
        """End the whole job: SIGTERM and up to ``graceful`` seconds' wait first if > 0, then SIGKILL."""
        ...

    def tree(self) -> object:
        """Note every live descendant now, so they can be killed even after their parent dies."""
        ...

    def close(self) -> None:
        """Release the job's resources (output pump, log file)."""
        ...


class JobFactory(Protocol):
    """Starts one attempt's job: runs ``cmd`` with ``env``, its output appended to ``log_path``.

    ``echo`` (if given) maps each output line to what is shown on the supervisor's stdout.
    :class:`JobProcess` (the class itself) is one.
    """

    def __call__(self, cmd: list[str], env: dict[str, str], log_path: Path, *,
                 echo: Callable[[str], str] | None, warm: Callable[[], Mapping[int, int]] | None = None) -> Job: ...


class JobProcess:
    """One attempt's torchrun process and everything under it: the real :class:`Job`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, *,
                 echo: Callable[[str], str] | None = None, warm: Callable[[], Mapping[int, int]] | None = None) -> None:
        """``echo`` (if given) maps each output line to what is shown on our stdout. ``warm`` (warm starts): the
        zygote's entry pid -> real worker pid map; a warm worker is the zygote's child, not torchrun's, so it is
        found through it (``Zygote.workers``)."""
        # torchrun writes to the attempt log itself, a regular file, never to a pipe of ours: if this process dies
        # (even by SIGKILL) torchrun's writes neither block nor fail with EPIPE. (With a pipe, torchrun sometimes
        # hung in interpreter shutdown, joining a --tee TailLog thread, after its supervisor was SIGKILLed.)
        # The output pump tails the file for the console and the root cause.
        self._log = open(log_path, "ab")  # noqa: SIM115
        self._log_path = log_path
        self._offset = self._log.tell()
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
        self._warm = warm
        self._ps = psutil.Process(self.proc.pid)
        self._known: dict[int, psutil.Process] = {}
        self._stopped: set[int] = set()  # workers signal_new_workers already reached
        self._echo = echo
        self._closing = threading.Event()
        self._pump = threading.Thread(target=self._pump_output, name="ftrain-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump_output(self) -> None:
        """Follow the log file from where this job started: whole lines, until torchrun exited and all is read."""
        with open(self._log_path, "rb") as f:
            f.seek(self._offset)
            partial = b""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith(b"\n"):
                        self._emit(partial)
                        partial = b""
                    continue
                if self.proc.poll() is not None or self._closing.is_set():
                    rest = f.read()  # whatever was written between the last read and the exit
                    for raw in (partial + rest).splitlines(keepends=True):
                        self._emit(raw)
                    return
                time.sleep(0.05)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace")
        self.tail.append(line.rstrip("\n"))
        if self._echo is not None:
            sys.stdout.write(self._echo(line if line.endswith("\n") else line + "\n"))
            sys.stdout.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_output(self, timeout: float = 5.0) -> None:
        """Let the output pump drain after the process exited."""
        self._pump.join(timeout)

    def tree(self) -> list[psutil.Process]:
        """torchrun and every live descendant. Remembers processes seen, so orphans reparented away are still found."""
        try:
            for p in [self._ps, *self._ps.children(recursive=True)]:
                self._known.setdefault(p.pid, p)
        except psutil.Error:
            pass
        warm = self._warm() if self._warm is not None else {}
        grew = bool(warm)
        while grew:  # torchrun's entry -> torchrun -> the ranks' entries -> their workers -> their children
            grew = False
            for entry, worker in warm.items():
                if entry in self._known and worker not in self._known:  # a worker forked for one of our entries
                    try:
                        real = psutil.Process(worker)
                        self._known[worker] = real
                        self._known.update((c.pid, c) for c in real.children(recursive=True))
                        grew = True
                    except psutil.Error:
                        pass
        return [p for p in self._known.values() if _alive(p)]

    def _torchrun(self) -> psutil.Process:
        """torchrun itself: our child, or, warm, the process the zygote forked for our child (its entry)."""
        real = self._warm().get(self.proc.pid) if self._warm is not None else None
        if real is not None:
            try:
                return self._known.setdefault(real, psutil.Process(real))
            except psutil.Error:
                pass
        return self._ps

    def workers(self) -> list[psutil.Process]:
        """The rank processes: torchrun's direct children (warm: the ranks' entries)."""
        try:
            kids = self._torchrun().children(recursive=False)
        except psutil.Error:
            return []
        for p in kids:
            self._known.setdefault(p.pid, p)
        return kids

    def worker_pids(self) -> frozenset[int]:
        return frozenset(p.pid for p in self.workers() if _alive(p))

    def signal_workers(self, sig: int) -> int:
        n = 0
        for _, target in self._addressees(sig):
            try:
                os.kill(target, sig)
                n += 1
            except OSError:
                pass
        return n

    def signal_new_workers(self, sig: int) -> int:
        n = 0
        for rank, target in self._addressees(sig):
            # Warm, an entry still waiting for its worker is not ready either: it would pass the signal on the
            # instant the worker is forked, before the worker handles it (it reads the stop marker anyway).
            if rank in self._stopped or _is_entry(target) or not _handles(target, sig):
                continue
            try:
                os.kill(target, sig)
            except OSError:
                continue
            self._stopped.add(rank)
            n += 1
        return n

    def _addressees(self, sig: int) -> list[tuple[int, int]]:
        """(rank process, whom a signal for it goes to) for each rank process (torchrun's child): that process, or,
        warm, the real worker. Not the entry: it forwards to the worker's whole process group (it cannot tell
        torchrun's ``killpg`` from a kill), which would also reach the worker's DataLoader processes, and SIGTERM
        kills those (the rank then fails with "DataLoader worker ... killed by signal"). A cold rank gets the
        signal alone; so does a warm one. SIGKILL still goes to the entry: the zygote then kills the worker's
        group, as torchrun's would be."""
        ranks = [p.pid for p in self.workers()]
        if sig == signal.SIGKILL or self._warm is None:
            return [(pid, pid) for pid in ranks]
        warm = self._warm()  # the zygote's workers file, read once
        return [(pid, warm.get(pid, pid)) for pid in ranks]

    def kill_tree(self, *, graceful: float = 0.0) -> None:
        """SIGTERM everything (if ``graceful``), wait up to that long, then SIGKILL what is left.

        Also signals torchrun's process group (it leads its own session), which reaches workers even
        after torchrun itself died and they were reparented out of sight.
        """
        procs = self.tree()
        if graceful > 0:
            self._killpg(signal.SIGTERM)
            for p in procs:
                _send(p, signal.SIGTERM)
            _, procs = psutil.wait_procs(procs, timeout=graceful)
        self._killpg(signal.SIGKILL)
        for p in procs:
            _send(p, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        self.wait_output()
        self._closing.set()  # a descendant may still hold the file open; stop following it
        self._pump.join(5.0)
        self._log.close()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (Linux: the SigCgt mask in /proc).

    A worker is a fresh Python process that needs seconds (importing torch, rendezvous) before its
    ftrain.Session installs the preemption handlers; until then SIGTERM would simply kill it, and the
    job would lose its final checkpoint. Such a worker is signalled once it handles the signal (and
    reads the stop marker anyway). Where the mask cannot be read (not Linux) every worker counts as ready,
    as before.
    """
    if not sys.platform.startswith("linux"):
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass  # gone already: nothing to signal
    return False


def _is_entry(pid: int) -> bool:
    """Whether ``pid`` is still a warm start's entry (``-m ftrain.supervisor.entry``), not a worker: one that
    started cold exec'd the script in place."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return ENTRY_MODULE.encode() in f.read().split(b"\0")
    except OSError:
        return False


def _send(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass
