"""A real process SIGKILLed right after an epoch-end save resumes with the work after its loop done exactly once.

The script counts epochs, steps a StepLR and "evaluates" (draws the RNG) after each ``for batch in loader:``
and saves at every epoch end (``checkpoint.every_steps`` = steps per epoch, synchronous so ``save.end`` fires
after the commit). It is killed at the first epoch end and at the last one (where only the code after the final
loop is left), relaunched each time, and must end with the uninterrupted run's state hash. The in-process matrix
(every step, the quickstart's ``break``, version-1 state) is tests/unit/data/test_epoch_end.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import child_env, final_hash

pytestmark = pytest.mark.slow

SCRIPT = '''
import sys

import torch
from torch.utils.data import Dataset

import ftrain


class Augmented(Dataset):
    def __len__(self):
        return 10  # batches of 4, 4, 2: 3 steps per epoch

    def __getitem__(self, i):
        return torch.full((4,), float(i)) + torch.rand(4)  # augmentation: seeded per (seed, epoch, index)


def main():
    epochs = int(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    counters = ftrain.Counters(epoch=0, evals=[])
    loader = ftrain.ResumableLoader(Augmented(), batch_size=4, seed=5, num_workers=2)
    session = ftrain.Session()  # checkpoint.* from the environment
    session.register(model=model, optimizer=opt, scheduler=sched, counters=counters, loader=loader)
    step = session.restore()
    print(f"restored={step} epoch_counter={counters.epoch}", flush=True)
    while counters.epoch < epochs:
        for x in loader:
            loss = model(x + 0.01 * torch.randn_like(x)).pow(2).mean()  # dropout-like draw
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            session.step(step)
        counters.epoch += 1  # the work after the loop, once per epoch
        sched.step()
        with torch.no_grad():
            counters.evals = [*counters.evals, float(model(torch.randn(2, 4)).sum())]
    session.close()
    print(f"epoch_counter={counters.epoch} lr={sched.get_last_lr()[0]} loader={loader.state_dict()}", flush=True)
    digest = ftrain.state_sha256([("model", model.state_dict()), ("optimizer", opt.state_dict()),
                                  ("scheduler", sched.state_dict()), ("counters", counters.state_dict()),
                                  ("loader", loader.state_dict()), ("rng", {"torch": torch.get_rng_state()})])
    print(f"final_state_sha256={digest}", flush=True)


main()
'''

EPOCHS, PER_EPOCH = 3, 3


def run(script: Path, ckpt: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), str(EPOCHS)], capture_output=True, text=True, timeout=120,
                          env=child_env(FTRAIN_CHECKPOINT_DIR=str(ckpt), FTRAIN_CHECKPOINT_EVERY_STEPS=str(PER_EPOCH),
                                        FTRAIN_CHECKPOINT_ASYNC_SAVE="false", **env))


def test_sigkill_right_after_epoch_end_saves(tmp_path):
    script = tmp_path / "epochs.py"
    script.write_text(SCRIPT)
    ref = run(script, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert f"epoch_counter={EPOCHS} lr={0.1 * 0.5 ** EPOCHS}" in ref.stdout, ref.stdout

    once = tmp_path / "once"
    once.mkdir()
    last = PER_EPOCH * EPOCHS
    faults = dict(FTRAIN_FAULTS=f"kill@save.end:step={PER_EPOCH},kill@save.end:step={last}",
                  FTRAIN_FAULTS_ONCE_DIR=str(once))
    outputs = []
    for expect_restored, expect_rc in ((0, -9), (PER_EPOCH, -9), (last, 0)):
        proc = run(script, tmp_path / "ckpt", **faults)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == expect_rc, f"attempt {len(outputs)}: rc {proc.returncode}\n{outputs[-1][-3000:]}"
        # Killed after the commit: the next attempt restores that very epoch end, with the counter before its
        # after-loop work (which the resumed run must then do once).
        epoch_counter = expect_restored // PER_EPOCH - 1 if expect_restored else 0
        assert f"restored={expect_restored} epoch_counter={epoch_counter}" in proc.stdout, outputs[-1][-3000:]
    final = outputs[-1]
    assert f"epoch_counter={EPOCHS} lr={0.1 * 0.5 ** EPOCHS}" in final, final[-3000:]
    assert final_hash(final) == final_hash(ref.stdout), f"resumed:\n{final[-2000:]}\nreference:\n{ref.stdout}"
