"""Shared contract: process exit codes used by every ftrain command and by worker processes.

Documented in README.md ("Exit codes"); keep the two in step.
"""
from __future__ import annotations

OK = 0
#: Training or a command failed (a crash, a corrupt checkpoint found by ``verify``).
FAILURE = 1
#: Bad input: unknown config key, bad value, missing script, unwritable directory.
USAGE = 2
#: Preempted or stopped by a signal; the job is resumable from its newest valid checkpoint (EX_TEMPFAIL).
PREEMPTED = 75
