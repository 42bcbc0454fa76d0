"""A simulated spot cluster on one host: an `ftrain rendezvous` store and `ftrain launch` nodes on 127.0.0.1.

The multi-node tests' harness (importable as ``cluster``: pytest puts tests/ on the path), also used by
``make demo-cluster`` (examples/demo_cluster.py), ``benchmarks/elastic.py`` and ``benchmarks/nodelocal.py``
(they put tests/ on ``sys.path``). A node may have a disk of its own (:func:`private`: a mount namespace in
which the checkpoint path shows the node's directory), so that no node sees another's checkpoints.
A node is one ``ftrain launch --nnodes MIN:MAX`` process; losing it means SIGKILLing its whole process tree at
once (torchrun starts its workers in new sessions, so a process-group kill would orphan them), as a reclaimed
VM loses everything on it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    """The environment for every process of the cluster: loopback only, one thread per rank."""
    out = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "FTRAIN_SUPERVISOR_BACKOFF_SECONDS": "0.2", "FTRAIN_SUPERVISOR_BACKOFF_MAX_SECONDS": "1"}
    out.update(extra)
    return out


class Process:
    """A child whose combined output is collected (and optionally echoed) by a thread, with timestamps."""

    def __init__(self, cmd: Sequence[str], environ: dict[str, str], *, echo: Callable[[str], None] | None = None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(list(cmd), cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self._echo = echo
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            if self._echo is not None:
                self._echo(line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match[str]] | None:
        """The first line matching ``pattern`` that arrived after ``after`` (a monotonic time), and when."""
        rx = re.compile(pattern)
        for t, line in list(self.lines):
            if t >= after:
                m = rx.search(line)
                if m:
                    return t, m
        return None

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL this process and every descendant at once (a reclaimed node)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.wait(timeout=10)


class Store(Process):
    """``ftrain rendezvous`` on a free loopback port: the rendezvous store, outside every node."""

    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "ftrain", "rendezvous", "--host", "127.0.0.1", "--port", "0"], env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = self.first(r"listening on (127\.0\.0\.1:\d+)")
            if found:
                self.endpoint = found[1].group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"ftrain rendezvous did not start:\n{self.output}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.wait(timeout=20)


def node(endpoint: str, run_id: str, ckpt: Path, script: Sequence[str], *, nproc: int = 2, nnodes: str = "1:2",
         extra: Sequence[str] = (), environ: dict[str, str] | None = None,
         echo: Callable[[str], None] | None = None, disk: Path | None = None) -> Process:
    """Start one node: ``ftrain launch --nnodes NNODES --nproc NPROC`` against the store at ``endpoint``.

    ``disk``: the node's own disk. The node then sees ``disk`` at ``ckpt`` and nothing of any other node's
    (:func:`private`), as with a Kubernetes ``emptyDir`` or a spot VM's local NVMe; without it, every node
    writes into the one directory ``ckpt`` (a shared filesystem)."""
    cmd = [sys.executable, "-m", "ftrain", "launch", "--nnodes", nnodes, "--nproc", str(nproc),
           "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--local-addr", "127.0.0.1",
           "--rdzv-conf", "last_call_timeout=1", "--ckpt-dir", str(ckpt), *extra, *script]
    return Process(private(cmd, disk, ckpt) if disk is not None else cmd, environ or env(), echo=echo)


def private(cmd: Sequence[str], disk: Path, at: Path) -> list[str]:
    """``cmd`` in a mount namespace of its own in which path ``at`` shows directory ``disk``: a disk that only
    this process tree sees, at the same path on every node (needs root: :func:`can_have_private_disks`)."""
    disk.mkdir(parents=True, exist_ok=True)
    at.mkdir(parents=True, exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(disk), str(at), *cmd]


def can_have_private_disks() -> str | None:
    """None if :func:`private` works here, else why not."""
    try:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not available ({e})"
    return None if proc.returncode == 0 else f"unshare --mount failed: {proc.stderr.strip()} (needs root)"


def wipe(disk: Path) -> None:
    """A node's disk after the node is gone for good: empty (a new VM, a new emptyDir)."""
    shutil.rmtree(disk, ignore_errors=True)
    disk.mkdir(parents=True)


def first_step(nodes: Sequence[Process], world: int, after: float) -> float | None:
    """When the first ``step N`` line arrived after ``after`` from a node that printed ``world W:`` last (the
    example's banner once it restored at world size ``world``)."""
    for node in nodes:
        banner = node.first(rf"^world {world}:", after=after)
        if banner:
            step = node.first(r"^step \d+ ", after=banner[0])
            if step:
                return step[0]
    return None


def wait_until(check: Callable[[], object], what: str, procs: Sequence[Process], timeout: float = 180) -> object:
    """Poll ``check`` until it returns something truthy; on timeout raise with every process's output tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    dump = Path(os.environ.get("FTRAIN_CLUSTER_DUMP", "/tmp")) / f"ftrain-cluster-{os.getpid()}-{time.time_ns()}"
    dump.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(procs):
        (dump / f"process-{i}.log").write_text(p.output)
    tails = "\n=====\n".join(p.output[-3000:] for p in procs)
    raise TimeoutError(f"timed out waiting for {what} (whole outputs in {dump}); outputs:\n{tails}")
