"""Shared contract: exception types. Every error ftrain raises is an :class:`FtrainError`.

Each carries the process exit code a command-line entry point should use, so
that "report the error and exit" is one line everywhere (see ``exitcodes.py``).
"""
from __future__ import annotations

from ftrain import exitcodes


class FtrainError(Exception):
    """Base class. ``str(err)`` is a one-line message naming the thing and the fix."""

    exit_code: int = exitcodes.FAILURE


class ConfigError(FtrainError):
    """A bad configuration key or value (YAML, environment or CLI flag)."""

    exit_code = exitcodes.USAGE


class UsageError(FtrainError):
    """Bad command-line input: a missing script or directory, a bad flag value."""

    exit_code = exitcodes.USAGE


class CheckpointError(FtrainError):
    """A checkpoint could not be written or read."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory cannot be created or written."""

    exit_code = exitcodes.USAGE


class CorruptCheckpoint(CheckpointError):
    """A checkpoint failed validation. ``path`` names the damaged file (or the directory)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NoValidCheckpoint(CheckpointError):
    """A resume was required but no checkpoint validates."""


class StateMismatch(FtrainError, ValueError):
    """Saved state does not fit the object it is loaded into (names the field)."""
