"""A tied-embedding language model killed (SIGKILL) at a random step and inside a save resumes bit-exact, tied.

The model is torch.nn only (an embedding whose weight is also the output head's, GPT-2's tie), trained by a real
process with ``FTRAIN_FAULTS``; the test restarts it until it finishes and compares it with an uninterrupted run:
the final model/optimizer hash, every checkpointed tensor, the tie after each restore, and the safetensors export.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import Background, assert_same_tensors, checkpoint_tensors, child_env, final_hash

pytestmark = pytest.mark.slow

STEPS, EVERY = 24, 4

SCRIPT = r'''
import sys

import torch
from torch import nn

import ftrain

ckpt, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
V, D = 512, 32


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.drop = nn.Dropout(0.1)  # draws from the global RNG: the resume must restore it exactly
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        return self.lm_head(self.drop(torch.tanh(self.mix(self.emb(idx)))))


torch.manual_seed(0)
model = TinyLM()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
session = ftrain.Session(overrides={"checkpoint.dir": ckpt, "checkpoint.every_steps": every,
                                    "checkpoint.retention.keep_last": 2})
session.register(model=model, optimizer=opt)
start = session.restore()
tied = model.lm_head.weight is model.emb.weight
print(f"restored {start} tied={tied}", flush=True)
for step in range(start + 1, steps + 1):
    idx = torch.randint(0, V, (8, 17))
    loss = nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, V), idx[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.6f}", flush=True)
    session.step(step)
session.close()
print(f"final tied={model.lm_head.weight is model.emb.weight}", flush=True)
print("final_state_sha256=" + ftrain.state_sha256([("model", model.state_dict()), ("optimizer", opt.state_dict())]),
      flush=True)
'''


def run(script: Path, ckpt: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), str(ckpt), str(STEPS), str(EVERY)], env=env,
                          capture_output=True, text=True, timeout=120)


def export(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ftrain.cli import main as cli

    assert cli(["ckpt", "export", str(ckpt), str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ftrain_aliases"]) == {"lm_head.weight": "emb.weight"}
    return load_file(str(out))


def test_tied_lm_killed_at_a_random_step_and_in_a_save_resumes_exact_and_tied(tmp_path, alongside):
    pytest.importorskip("safetensors")
    script = tmp_path / "tied_lm.py"
    script.write_text(SCRIPT)
    # The uninterrupted run, in the background: the killed runs below are one process at a time (another core).
    background = alongside(Background([sys.executable, str(script), str(tmp_path / "ref"), str(STEPS), str(EVERY)],
                                      child_env(), timeout=120))
    seed = int(os.environ.get("FTRAIN_TEST_SEED", time.time_ns() % 10_000))
    kill_at = random.Random(seed).randint(2, STEPS - 2)
    once = tmp_path / "once"
    once.mkdir()
    # One kill at a random step, one while the tensor bytes of the save of step 12 are being written (a
    # checkpoint holding the alias must never be half-committed).
    env = child_env(FTRAIN_FAULTS=f"kill@step:step={kill_at},kill@save.mid_write:step=12",
                    FTRAIN_FAULTS_ONCE_DIR=str(once))
    restored: list[tuple[int, str]] = []
    for attempt in range(5):
        proc = run(script, tmp_path / "ckpt", env)
        restored += re.findall(r"restored (\d+) tied=(\w+)", proc.stdout)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f"seed {seed} attempt {attempt}: {proc.returncode}\n" \
                                                   f"{proc.stderr[-3000:]}"
    else:
        pytest.fail(f"seed {seed}: did not finish in 5 attempts")
    ref = background.result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "final tied=True" in ref.stdout
    fired = len(list(once.iterdir()))
    assert fired == 2, f"seed {seed}: {fired} of the 2 injected kills fired"
    assert attempt >= 2 and all(t == "True" for _, t in restored), restored
    assert any(int(s) > 0 for s, _ in restored), f"seed {seed}: never resumed from a checkpoint: {restored}"
    assert "final tied=True" in proc.stdout
    assert final_hash(proc.stdout) == final_hash(ref.stdout), f"seed {seed}: resumed state differs"
    got, want = checkpoint_tensors(tmp_path / "ckpt"), checkpoint_tensors(tmp_path / "ref")
    assert_same_tensors(got, want)
    assert "replicated/model/lm_head.weight" not in got  # stored once
    exported, reference = export(tmp_path / "ckpt", tmp_path / "a.safetensors"), export(tmp_path / "ref",
                                                                                         tmp_path / "b.safetensors")
    assert set(exported) == {"emb.weight", "mix.weight", "mix.bias"}
    assert_same_tensors(exported, reference)
