"""Shared contract: exception types. Every error ftrain raises is an :class:`FtrainError`.

Each carries the process exit code a command-line entry point should use, so
that "report the error and exit" is one line everywhere (see ``exitcodes.py``).

Also :func:`printable`, the one sanitiser for text that came from files
(checkpoint manifests, directory names) before it reaches a terminal: both the
storage layer (:class:`CorruptCheckpoint`) and the CLI use it.
"""
from __future__ import annotations

from ftrain import exitcodes


def printable(text: object) -> str:
    """``str(text)`` safe to print on a terminal, one line, still readable.

    Every character that ``str.isprintable`` rejects is replaced by its Python
    escape: control characters (ESC, which starts ANSI/OSC escape sequences that
    can clear the screen, retitle the window or forge output; BEL; CR, LF and the
    other line breaks, which forge lines; C1 controls such as U+009B CSI) as
    ``\\xNN``; format characters (bidirectional overrides such as U+202E, zero
    width spaces), separators other than the space, unassigned code points and lone
    surrogates (undecodable bytes in a file name) as ``\\uNNNN`` or ``\\UNNNNNNNN``.
    Everything printable, non-ASCII letters included, is kept as is, so the user
    still sees what a hostile field held. The result is all printable, so applying
    it twice changes nothing. A backslash is kept: the escaped form can be told from
    a control character, not from the same text typed literally (that is harmless).
    """
    s = str(text)
    if s.isprintable():  # the common case: one scan, no copy
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


class FtrainError(Exception):
    """Base class. ``str(err)`` is a one-line message naming the thing and the fix."""

    exit_code: int = exitcodes.FAILURE
    #: A mistake no restart can fix (bad config or usage, a directory held by another job, state that does not
    #: fit the checkpoint): a worker records it as such in its error file and ``ftrain launch`` stops at once
    #: with ``exit_code`` instead of spending its restarts on it (docs/FORMAT.md, "Attempt directory").
    permanent: bool = False


class ConfigError(FtrainError):
    """A bad configuration key or value (YAML, environment or CLI flag)."""

    exit_code = exitcodes.USAGE
    permanent = True


class UsageError(FtrainError):
    """Bad command-line input: a missing script or directory, a bad flag value."""

    exit_code = exitcodes.USAGE
    permanent = True


class CheckpointError(FtrainError):
    """A checkpoint could not be written or read."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory cannot be created or written (or, for the remote tier, does not exist)."""

    exit_code = exitcodes.USAGE
    permanent = True


class RemoteNotFound(CheckpointDirError):
    """``checkpoint.remote.url`` names a bucket (or container) that does not exist: a typo, or one not created yet."""


class LeaseError(CheckpointDirError):
    """The checkpoint directory is held by another job (its lease); the message names it and the fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint failed validation. ``path`` names the damaged file (or the directory).

    ``path`` and ``reason`` are stored sanitised (:func:`printable`): reasons quote
    file content (an unknown format version, a field's value) and paths may hold
    any byte, and both end up in warnings and error lines on a terminal.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = printable(path)
        self.reason = printable(reason)
        super().__init__(f"{self.path}: {self.reason}")


class PeerFailed(CheckpointError):
    """This rank stops because another rank failed (a save or a checkpoint setup the ranks agree on): the cause
    is in that rank's error, not here. The supervisor's console folds these into one line by this type."""


class NoValidCheckpoint(CheckpointError):
    """A resume was required but no checkpoint validates."""


class IncompleteCheckpoints(CheckpointError):
    """Only parts of the newest checkpoints are reachable: the rest was written to node-local disks of nodes that
    are not in the job now. Starting fresh would throw them away, so the job refuses (the message lists what
    each disk holds and how to start over on purpose); it may succeed once the node is back."""


class StateMismatch(FtrainError, ValueError):
    """Saved state does not fit the object it is loaded into (names the field)."""

    permanent = True


def permanent_types() -> frozenset[str]:
    """The class names of every permanent error (the supervisor's console recognises them in tracebacks)."""
    out: set[str] = set()
    todo: list[type[FtrainError]] = [FtrainError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.permanent:
            out.add(cls.__name__)
    return frozenset(out)
