"""The supervisor's console filter: worker output as written, failure noise folded into one line per failure.

When one rank dies, every surviving rank raises out of its next collective and prints a
Python traceback, then torchrun prints its own traceback and its ChildFailedError box:
80-90 lines that bury the one line that matters (the supervisor's "attempt N failed
(rank 1 exited with signal SIGKILL)"). :class:`Console` is the ``echo`` callable of
:class:`~ftrain.supervisor.job.JobProcess`: it maps each output line to what the console
shows ("" for nothing). Normal lines pass as :func:`strip_prefix` shows them; traceback
blocks are held back and, once their exception line arrives, either folded (a collective
error: a consequence of a dead peer, counted for :meth:`Console.summary`), dropped
(torchrun's own ChildFailedError, and permanent errors such as ``ConfigError``: the supervisor
reports its root cause, the permanent error in one line) or shown as one
line (any other exception: a root cause). Nothing is lost: torchrun writes every line to the
attempt's torchrun.log and per-rank logs itself. When unsure a line belongs to a traceback,
it is shown. ``FTRAIN_RAW_CONSOLE=1`` shows everything as before. Pure: lines in, strings out.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ftrain import envvars
from ftrain.errors import PeerFailed, permanent_types, printable

_PREFIX = re.compile(r"^@@ftrain-rank(\d+)@@")  # torchrun's --tee prefix (supervisor._PREFIX_TEMPLATE)
_TORCH_RANK = re.compile(r"^\[rank(\d+)\]: ?")  # torch's own stderr prefix inside worker lines
_TRACEBACK = ("Traceback (most recent call last):", "  + Exception Group Traceback (most recent call last):")
_CHAINED = ("During handling of the above exception, another exception occurred:",
            "The above exception was the direct cause of the following exception:")
# Errors a rank raises because a peer is gone (its socket closed, a collective timed out waiting for it): the
# consequence of the failure, never its cause, and raised by every surviving rank at once.
_COLLECTIVE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "connectFullMesh",
               "DistBackendError", "DistNetworkError", "DistStoreError", "NCCL error", "ncclRemoteError",
               "ncclSystemError", "ProcessGroupNCCL", "Socket Timeout", "/gloo/", "remote process exited")
# The lines of a folded NCCL error's multi-line message (they follow its exception line).
_COLLECTIVE_MORE = ("Last error:", "nccl", "socketProgress", *_COLLECTIVE)
# torchrun's (torch.distributed.elastic's) glog-style lines about the failing worker group: part of the wall.
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*elastic\S*\] ")
_GLOG_NOISE = ("closing signal", "failed (exitcode:", "Unable to shutdown process", "death signal, shutting down")
_BOX = re.compile(r"^={20,}\s*$")  # the ChildFailedError report's top and bottom rules
_PERMANENT = permanent_types()  # class names of the errors the supervisor stops on (and reports) itself
_SOURCE_PATH = re.compile(r"\[([^\]\s]*/[^\]\s]*?)(?::\d+)?\]")  # gloo's "[/__w/pytorch/.../gloo/.../pair.cc:553]"


def is_collective_error(text: str) -> bool:
    """Whether an exception message is a collective failing because a peer is gone (a consequence, not a cause)."""
    return any(p in text for p in _COLLECTIVE)


def strip_prefix(line: str) -> str:
    """Worker lines come tee'd with a rank prefix: rank 0's are shown as written, others as ``[rank N] ...``."""
    m = _PREFIX.match(line)
    if not m:
        return line
    rank = int(m.group(1))
    rest = line[m.end():]
    return rest if rank == 0 else f"[rank {rank}] {rest}"


@dataclass
class _After:
    """A source whose traceback just ended: blank lines held until we know whether a chained traceback follows."""
    folded: bool
    held: list[str] = field(default_factory=list)


class Console:
    """One attempt's (or one multi-node launch's) console filter; call it with each output line."""

    def __init__(self, log_path: Path | str, env: Mapping[str, str] | None = None,
                 mistakes: Callable[[], Iterable[str]] = tuple) -> None:
        """``mistakes``: the permanent errors' messages recorded so far (``AttemptFiles.mistakes``); a worker line
        that repeats one is dropped (a script that prints the error it caught, once per rank)."""
        self.log_path = printable(log_path)
        self._mistakes = mistakes
        self.raw = (os.environ if env is None else env).get(envvars.RAW_CONSOLE, "") == "1"
        self._open: dict[int | None, int] = {}  # source (rank, None: torchrun) -> lines of its open traceback
        self._after: dict[int | None, _After] = {}
        self._box: str | None = None  # torchrun's ChildFailedError report: "expect" its rule, or "in" it
        self._folded: dict[int, str] = {}  # rank -> its first collective error's message
        self._elsewhere: set[int] = set()  # ranks that raised because another rank failed

    def __call__(self, line: str) -> str:
        if self.raw:
            return strip_prefix(line)
        m = _PREFIX.match(line)
        body = (line[m.end():] if m else line).rstrip("\r\n")
        inner = _TORCH_RANK.match(body)
        text = body[inner.end():] if inner else body
        src: int | None = int(m.group(1)) if m else int(inner.group(1)) if inner else None
        return self._line(src, text, line)

    def _line(self, src: int | None, text: str, line: str) -> str:
        if src in self._open:
            if text[:1] in (" ", "\t") or not text.strip():
                self._open[src] += 1
                return ""
            del self._open[src]
            return self._ended(src, text)
        after = self._after.pop(src, None)
        if after is not None:
            if text in _CHAINED:  # a chained traceback follows: the blank lines before it are part of it
                self._after[src] = _After(after.folded)
                return ""
            if not text.strip() or (after.folded and any(p in text for p in _COLLECTIVE_MORE)
                                    and not text.startswith(_TRACEBACK)):
                after.held += [] if text.strip() else [strip_prefix(line)]  # (a folded error's next line: dropped)
                self._after[src] = after
                return ""
        held = "".join(after.held) if after is not None and not text.startswith(_TRACEBACK) else ""
        if src is None and self._box is not None:
            if _BOX.match(text):
                self._box = "in" if self._box == "expect" else None
                return ""
            if self._box == "in":
                return ""
            self._box = None
        if text.startswith(_TRACEBACK):
            self._open[src] = 1
            return held
        if src is None and _GLOG.match(text) and any(p in text for p in _GLOG_NOISE):
            return held
        if src is not None and any(m in text for m in self._mistakes()):
            return held  # the supervisor says it, once
        return held + strip_prefix(line)

    def _ended(self, src: int | None, exc: str) -> str:
        """A traceback's exception line arrived: fold it, drop it or show it as one line."""
        if src is None:
            if "ChildFailedError" in exc.split(":", 1)[0]:
                self._box = "expect"  # its message is the report box that follows
                return ""
            self._after[src] = _After(False)
            return f"torchrun: {_shorten(exc)} (traceback in {self.log_path})\n"
        exc_type = exc.split(":", 1)[0].rsplit(".", 1)[-1].strip()
        if exc_type in _PERMANENT:
            # A mistake (bad config, a checkpoint of another model): every rank raises it, and the supervisor stops
            # and says it once, in one line. Dropped here so it is not printed once per rank as well.
            self._after[src] = _After(False)
            return ""
        if exc_type == PeerFailed.__name__:  # this rank stopped because another one failed: that one is shown
            self._after[src] = _After(False)
            self._elsewhere.add(src)
            return ""
        folded = is_collective_error(exc)
        self._after[src] = _After(folded)
        if folded:
            self._folded.setdefault(src, _shorten(exc))
            return ""
        return f"[rank {src}] {_shorten(exc)} (traceback in {self.log_path})\n"

    def summary(self) -> list[str]:
        """At most one line on what was folded or cut off since the last call (then forgotten); [] if nothing."""
        parts = []
        if self._folded:
            n = len(self._folded)
            first = next(iter(self._folded.values()))
            parts.append(f"{_ranks(self._folded)}: {'collective errors' if n > 1 else 'a collective error'} after "
                         f"a peer died ({first})")
        if self._elsewhere:
            parts.append(f"{_ranks(self._elsewhere)}: stopped because another rank failed")
        if self._open:  # tracebacks that never ended: the job was killed while they were written
            ranks = [s for s in self._open if s is not None]
            who = [_ranks(ranks)] if ranks else []
            who += ["torchrun"] if None in self._open else []
            parts.append(f"{' and '.join(who)}: traceback cut off (the job ended while it was written)")
        self._open, self._after, self._box, self._folded, self._elsewhere = {}, {}, None, {}, set()
        return [f"{'; '.join(parts)}; full text in {self.log_path}"] if parts else []


def flush(console: Console | None, say: Callable[[str], None]) -> None:
    """Say the console's summary, if any (the supervisor calls it when an attempt or a worker group ended)."""
    for line in console.summary() if console is not None else []:
        say(line)


def _shorten(exc: str, limit: int = 100) -> str:
    """One printable line: source paths cut to their library (``[gloo]``) or file, at most about ``limit`` chars."""
    def short(m: re.Match[str]) -> str:
        path = m.group(1)
        return "[gloo]" if "/gloo/" in path else f"[{path.rsplit('/', 1)[-1]}]"
    s = printable(_SOURCE_PATH.sub(short, exc.strip()))
    if len(s) <= limit:
        return s
    end = s.find(". ", 0, limit)  # the first sentence when it fits ("... Connection closed by peer [..]:1234.")
    return s[:end + 1] if end > limit // 3 else s[:limit].rstrip() + "..."


def _ranks(ranks: Iterable[int]) -> str:
    """``rank 3``, ``ranks 0, 2``, ``ranks 0-5, 7``: runs of three or more as ranges."""
    rs = sorted(ranks)
    runs: list[list[int]] = []
    for r in rs:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)
    return f"rank{'s' if len(rs) > 1 else ''} {text}"
