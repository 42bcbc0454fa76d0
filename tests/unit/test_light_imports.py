"""The supervisor side never imports torch: every relaunch, ``ftrain status`` and ``ftrain goodput`` would pay
its import (2.4 s here) for nothing (docs/PERFORMANCE.md, "Goodput")."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ftrain.checkpoint import codec, format

SUPERVISOR_SIDE = ["ftrain.cli", "ftrain.cli.launch", "ftrain.cli.goodput", "ftrain.supervisor.supervisor",
                   "ftrain.checkpoint.store", "ftrain.checkpoint.lease", "ftrain.telemetry.timeline",
                   "ftrain.telemetry.live", "ftrain.telemetry.advisor"]


@pytest.mark.slow  # starts processes
def test_the_supervisor_side_imports_no_torch() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in SUPERVISOR_SIDE)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_torch_free_dtype_table_matches_the_codec() -> None:
    assert {name: d.itemsize for name, d in codec.DTYPES.items()} == format.ITEMSIZE
