"""Shared contract: fault injection for tests and drills; make a process die at a named point (either side).

``FTRAIN_FAULTS`` holds comma-separated specs ``ACTION@POINT[:step=N][:rank=R]``:

* ACTION: ``kill`` (SIGKILL itself), ``term`` (SIGTERM itself), ``raise``
  (raise :class:`InjectedFault`), ``hang`` (sleep forever, for hang detection),
  ``killnode`` (SIGKILL the whole node at once: the ``ftrain launch`` that
  supervises this worker, named by ``FTRAIN_LAUNCHER_PID``, and every process
  under it, as a reclaimed VM loses them; itself only without a launcher).
* POINT: ``step`` (in ``Session.step``), ``save.begin``, ``save.mid_write``
  (half of the shard bytes written), ``save.shard_bin_written``,
  ``save.before_manifest``, ``save.before_rename``, ``save.before_latest``,
  ``save.end``, ``restore.end``, ``upload.file`` (after each file of a remote
  upload), ``upload.before_manifest`` (every file remote, the manifest not yet).

When ``FTRAIN_FAULTS_ONCE_DIR`` is set, each spec fires at most once across
process restarts (a marker file is created there before firing), so a relaunched
job does not die at the same place forever.

The hot path costs one tuple test when no fault is configured.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass

from ftrain import envvars
from ftrain.errors import ConfigError, FtrainError


class InjectedFault(FtrainError):
    """Raised by a ``raise@...`` fault spec."""


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int | None
    rank: int | None
    spec: str


ACTIONS = ("kill", "term", "raise", "hang", "killnode")
POINTS = ("step", "save.begin", "save.mid_write", "save.shard_bin_written", "save.before_manifest",
          "save.before_rename", "save.before_latest", "save.end", "restore.end", "upload.file",
          "upload.before_manifest")


def parse(text: str) -> tuple[Fault, ...]:
    """Parse ``FTRAIN_FAULTS``; a typo is an error, never a fault that silently fires everywhere or nowhere."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        head, *conds = spec.split(":")
        action, _, point = head.partition("@")
        kv = dict(c.partition("=")[::2] for c in conds)
        try:
            if action not in ACTIONS or point not in POINTS or set(kv) - {"step", "rank"}:
                raise ValueError
            step = int(kv["step"]) if "step" in kv else None
            rank = int(kv["rank"]) if "rank" in kv else None
        except ValueError:
            raise ConfigError(f"bad {envvars.FAULTS} spec {spec!r}: expected ACTION@POINT[:step=N][:rank=R] with "
                              f"ACTION in {ACTIONS} and POINT in {POINTS}") from None
        faults.append(Fault(action, point, step, rank, spec))
    return tuple(faults)


_FAULTS = parse(os.environ.get(envvars.FAULTS, ""))


def point(name: str, *, step: int, rank: int) -> None:
    """Fire any fault configured for this point; a no-op in production."""
    if not _FAULTS:
        return
    for f in _FAULTS:
        if f.point == name and f.step in (None, step) and f.rank in (None, rank) and _claim(f):
            _fire(f)


def _claim(f: Fault) -> bool:
    once_dir = os.environ.get(envvars.FAULTS_ONCE_DIR)
    if not once_dir:
        return True
    marker = os.path.join(once_dir, "fault-" + hashlib.sha1(f.spec.encode()).hexdigest()[:16])
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _kill_node() -> None:
    """SIGKILL the supervising launcher and all its descendants, this process last (a node lost whole)."""
    import psutil  # only here: the hot path never needs it

    me = psutil.Process()
    launcher = os.environ.get(envvars.LAUNCHER_PID, "")
    try:
        root = psutil.Process(int(launcher)) if launcher.isdigit() else me
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [me]
    for p in procs:
        if p.pid != me.pid:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def _fire(f: Fault) -> None:
    if f.action == "killnode":
        _kill_node()
    elif f.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif f.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif f.action == "hang":
        while True:
            time.sleep(3600)
    else:
        raise InjectedFault(f"injected fault {f.spec}")
