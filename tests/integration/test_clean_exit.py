"""A worker's exit hook (session/teardown.py) in a real process: the process group it tears down, and when not."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import child_env

pytestmark = pytest.mark.slow

SCRIPT = """
import sys, tempfile, torch.distributed as dist
from ftrain.session import teardown
store = dist.FileStore(tempfile.mktemp(), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
if sys.argv[1] == "crash":
    sys.last_value = RuntimeError("boom")  # what the interpreter records for an uncaught exception
teardown._at_exit()
print("initialized", dist.is_initialized())
"""


def test_the_hook_tears_the_process_group_down_unless_the_process_is_crashing() -> None:
    def run(mode: str) -> str:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=child_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert "initialized False" in run("clean")
    assert "initialized True" in run("crash")  # its peers may be gone: never wait on them
