"""Which ranks share a checkpoint directory is found out at every start (docs/FORMAT.md, "Disks"), with 2 real
ranks: each its own directory (node-local), one of them missing later (no fresh start over its part), and a copy
that kept the original's disk id. (One shared directory is what every other multi-rank test runs on.)"""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from ftrain.checkpoint import format

from helpers import child_env, torchrun

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    import ftrain
    from ftrain.config import CheckpointConfig, FtrainConfig
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    session = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=sys.argv[1 + rank], replicas=0)))
    session.register(model=torch.nn.Linear(2, 2))
    try:
        print("restored", session.restore(), flush=True)
        session.save(5, blocking=True)
        session.close()
    except ftrain.FtrainError as e:
        print(f"ftrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print("disks", len(session._checkpointer.layout.order), flush=True)
    dist.destroy_process_group()
""")


def test_the_layout_is_found_out_and_a_copied_disk_id_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    a, b = tmp_path / "a", tmp_path / "b"
    # Two directories: two disks, each committing its own rank's files.
    proc = torchrun(script, [str(a), str(b)], child_env(), check=True)
    assert "disks 2" in proc.stdout and "node-local: 2 disks" in proc.stderr
    assert sorted(p.name for p in (a / format.step_dirname(5)).iterdir()) == sorted(["manifest.json",
                                                                                    *format.shard_names(0)])
    # Both ranks on a: b, which holds rank 1's part of step 5, is not in the job: never a fresh start over it.
    proc = torchrun(script, [str(a), str(a)], child_env())
    assert proc.returncode != 0 and "parts of step(s) 5 were written to node-local disks that are not in the job" \
        in proc.stderr, proc.stderr[-3000:]
    assert "step 5: ranks 0 of 2" in proc.stderr
    assert [p.name for p in sorted(a.iterdir()) if p.name.startswith("step")] == [format.step_dirname(5)]
    # A copy of a's root (its disk-id included) beside the original: refused, before anything is written.
    shutil.rmtree(b)
    shutil.copytree(a, b)
    proc = torchrun(script, [str(a), str(b)], child_env())
    assert proc.returncode != 0
    assert f"has the disk id of rank 0's but is another directory (copied with its disk-id file?); remove {b}" \
           f"/disk-id" in proc.stderr, proc.stderr[-3000:]
    assert not [p for p in b.iterdir() if p.name.startswith(".tmp")] and not (b / "lease.json").exists()
