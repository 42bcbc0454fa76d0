"""FSDP2 (``fully_shard`` on a CPU mesh, gloo) with real processes: resharding between world sizes, a damaged
chunk, and SIGKILLs under ``ftrain launch``.

Bit-identity across world sizes is judged on whole tensors gathered through torch's full state dict, in the
test scripts only (ftrain itself never gathers): every model and AdamW tensor after a restore must equal what
the saving run held when it saved.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ftrain import exitcodes
from ftrain.checkpoint import format as fmt

from helpers import (
    EXAMPLE,
    ROOT,
    Launch,
    assert_no_orphans,
    assert_same_tensors,
    checkpoint_tensors,
    child_env,
    final_hash,
    launch_env,
    torchrun,
)

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "integration" / "scripts" / "fsdp_reshard.py"


def run(nproc: int, *args: str) -> str:
    """The script at ``nproc`` ranks (one: a plain process, the model unsharded); its stdout."""
    if nproc > 1:
        return torchrun(SCRIPT, list(args), child_env(), nproc=nproc, check=True).stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert len(ta) > 50 and any(k.startswith("optimizer/state/") for k in ta), sorted(ta)[:5]
    assert_same_tensors(ta, tb)


def test_fsdp_state_reshards_4_to_2_to_4_bit_exact_and_a_damaged_chunk_falls_back(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    saved4, restored2, saved2, restored4, restored1 = (tmp_path / f"{n}.safetensors" for n in
                                                      ("saved4", "restored2", "saved2", "restored4", "restored1"))
    run(4, ckpt, "--train", "3", "--dump-saved", str(saved4))
    out = run(2, ckpt, "--dump-restored", str(restored2), "--train", "2", "--dump-saved", str(saved2))
    assert "restored=3 world=2" in out
    same(saved4, restored2)
    out = run(4, ckpt, "--dump-restored", str(restored4))
    assert "restored=5 world=4" in out
    same(saved2, restored4)

    # Each rank of the 2-rank save wrote half of every parameter: damage one byte inside one chunk of rank 1's.
    step5 = tmp_path / "ckpt" / fmt.step_dirname(5)
    body = json.loads((step5 / fmt.MANIFEST).read_text())["body"]
    name, entry = next((n, e) for n, e in sorted(body["sharded"].items()) if n.endswith("layers.0.linear1.weight")
                       and "optimizer" not in n)
    chunk = next(c for c in entry["chunks"] if c["file"] == fmt.shard_names(1)[1])
    with open(step5 / chunk["file"], "r+b") as f:
        f.seek(chunk["offset"] + chunk["nbytes"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    # One process, unsharded: it reads every chunk, finds the damage, and falls back to step 3 (written by 4 ranks).
    out = run(1, ckpt, "--dump-restored", str(restored1))
    assert "restored=3 world=1" in out
    same(saved4, restored1)


def test_fsdp_job_under_launch_survives_sigkills_bit_exact(tmp_path: Path) -> None:
    """Two FSDP2 ranks; SIGKILLs of random ranks at a random step, inside writing a shard, and between the shards
    and the manifest; the supervisor restarts the job each time. The final model and AdamW state (gathered whole)
    and every checkpointed tensor must equal an uninterrupted run's."""
    steps = 40
    script = [str(EXAMPLE), "--fsdp", "--steps", str(steps), "--print-every", "1", "--workers", "0"]
    common = ["--nproc", "2", "--save-every-steps", "5", "--max-restarts", "6"]
    ref = Launch([*common, "--ckpt-dir", str(tmp_path / "ref"), "--rdzv-id", "fsdp-ref", *script], launch_env())
    assert ref.wait() == 0, ref.output[-4000:]

    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    faults = [f"kill@step:step={rng.randint(3, 12)}:rank={rng.randrange(2)}",
              f"kill@save.mid_write:step={rng.choice([15, 20])}:rank={rng.randrange(2)}",
              f"kill@save.before_manifest:step={rng.choice([25, 30])}:rank=0",
              f"kill@step:step={rng.randint(32, 38)}:rank={rng.randrange(2)}"]
    once = tmp_path / "once"
    once.mkdir()
    # The one chaos test with warm starts off (supervisor.warm_start: false): cold workers, as before the zygote;
    # every other chaos test forks its workers warm (the default).
    env = launch_env(FTRAIN_FAULTS=",".join(faults), FTRAIN_FAULTS_ONCE_DIR=str(once), FTRAIN_SUPERVISOR_WARM_START="0")
    ckpt = tmp_path / "ckpt"
    run_ = Launch([*common, "--ckpt-dir", str(ckpt), "--rdzv-id", "fsdp-chaos", *script], env)
    rc = run_.wait(timeout=400)
    info = f"seed {seed}, faults {faults}:\n{run_.output[-5000:]}"
    assert rc == exitcodes.OK, info
    assert not list((ckpt / "logs" / "fsdp-chaos").glob("*/zygote.log")), "warm starts were not off"
    assert len(list(once.iterdir())) == 4, info
    assert len(re.findall(r"worker group \d+ (?:failed|hung) \(", run_.output)) == 4, info
    assert final_hash(run_.output) == final_hash(ref.output), f"seed {seed}: final state differs"
    assert_same_tensors(checkpoint_tensors(ckpt), checkpoint_tensors(tmp_path / "ref"))
    assert_no_orphans("fsdp-chaos")
