"""Epoch boundaries survive a restart: the code after ``for batch in loader:`` runs on resume as it did uninterrupted.

The loader's position tells "epoch e's last batch delivered, loop not ended" ``(e, D)`` from "epoch e+1 begun"
``(e+1, 0)``. A save in the loop body at an epoch's last batch (``checkpoint.every_steps`` = steps per epoch)
holds the first; the resumed loader's first ``for`` loop then ends at once, so an epoch counter, a per-epoch
``StepLR.step()`` and an evaluation after the loop run exactly as in the uninterrupted run.

In-process (no processes, ``num_workers=0``): a "kill" is the script stopping right after ``session.step(k)``
(the save is synchronous, so it is committed), all its objects discarded, and fresh ones restored from the
checkpoint directory by a new Session. The real-process version is tests/integration/test_epoch_end.py.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.data import ResumableLoader
from ftrain.errors import StateMismatch
from ftrain.session import rng

from helpers import AugDataset, cfg

# A process resumed from an epoch-end save runs the code after the loop (scheduler.step()) before its first
# optimizer.step(): PyTorch's order heuristic warns, but the schedule is exact (the tests compare it).
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")

N, BS = 10, 4  # the tail padded to a whole global batch (4): batches of 4, 4, 4, D = 12 samples, 3 steps
D = 12
PER_EPOCH = 3
EPOCHS = 3


class Killed(Exception):
    """The simulated SIGKILL: the script stops here; nothing after it runs."""


class EpochJob:
    """A model, SGD with momentum, a per-epoch StepLR, an epoch counter and a loader; work per step and per epoch.

    ``log`` maps step -> what that step saw (epoch counter, learning rate, sample indices), shared across the
    attempts of one run so a replayed step is checked against its first execution.
    """

    def __init__(self, log: dict[int, tuple]) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(5, 1, dtype=torch.float64)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        self.counters = ftrain.Counters(epoch=0, evals=[])
        self.loader = ResumableLoader(AugDataset(N), batch_size=BS, seed=3)
        assert len(self.loader) == PER_EPOCH
        self.log = log

    def register(self, session: ftrain.Session) -> None:
        session.register(model=self.model, optimizer=self.opt, scheduler=self.sched, counters=self.counters,
                         loader=self.loader)

    def train_step(self, step: int, batch: torch.Tensor) -> None:
        # Noise from the global RNG, like dropout: a replayed or skipped draw shows in the weights.
        x = batch[:, 1:] + 0.01 * torch.randn(batch.shape[0], 5, dtype=torch.float64)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        seen = (self.counters.epoch, self.sched.get_last_lr()[0], batch[:, 0].long().tolist())
        assert self.log.setdefault(step, seen) == seen, f"step {step} replayed differently"

    def end_epoch(self) -> None:
        """The work after the loop: count the epoch, step the per-epoch schedule, "evaluate" (draws the RNG)."""
        self.counters.epoch += 1
        self.sched.step()
        with torch.no_grad():
            self.counters.evals = [*self.counters.evals, float(self.model(torch.randn(2, 5, dtype=torch.float64))
                                                             .sum())]

    def state(self) -> str:
        """Everything a resume must reproduce: model, optimizer, scheduler, counters, loader position, RNG."""
        return ftrain.state_sha256([("model", self.model.state_dict()), ("optimizer", self.opt.state_dict()),
                                    ("scheduler", self.sched.state_dict()), ("counters", self.counters.state_dict()),
                                    ("loader", self.loader.state_dict()), ("rng", rng.capture())])

    def summary(self) -> tuple:
        """The readable part of :meth:`state`, for assertion messages."""
        sd = self.loader.state_dict()
        return self.counters.epoch, self.sched.last_epoch, (sd["epoch"], sd["cursor"])


Script = Callable[[EpochJob, ftrain.Session, int, set[int]], None]


def epoch_script(job: EpochJob, session: ftrain.Session, step: int, kill_at: set[int]) -> None:
    """Epoch-driven: the counter and the schedule are stepped after each ``for`` loop, which is never broken."""
    while job.counters.epoch < EPOCHS:
        for batch in job.loader:
            step += 1
            job.train_step(step, batch)
            session.step(step)
            if step in kill_at:
                raise Killed
        job.end_epoch()


def quickstart_script(total: int) -> Script:
    """README quickstart, step-driven with a ``break`` at ``total``; the per-epoch work in the loop's ``else:``."""

    def script(job: EpochJob, session: ftrain.Session, step: int, kill_at: set[int]) -> None:
        while step < total:
            for batch in job.loader:
                step += 1
                job.train_step(step, batch)
                session.step(step)
                if step in kill_at:
                    raise Killed
                if step == total:
                    break
            else:  # the loop ran out: the epoch ended (never after a break, also not one after the last batch)
                job.end_epoch()
        session.save(step)

    return script


def attempt(path: Path, script: Script, log: dict[int, tuple], kill_at: set[int] = frozenset()) -> EpochJob | None:
    """One process lifetime: fresh objects, restore, run the script; None if it was "killed"."""
    job = EpochJob(log)
    session = ftrain.Session(cfg(path, every_steps=PER_EPOCH, async_save=False))
    job.register(session)
    step = session.restore()
    try:
        script(job, session, step, set(kill_at))
    except Killed:
        return None
    finally:
        session.close()  # nothing in flight (synchronous saves): frees the directory for the next attempt
    return job


def run_with_kills(path: Path, script: Script, kills: list[int]) -> tuple[EpochJob, dict[int, tuple]]:
    """Kill once after each step in ``kills`` (in order), relaunching after each, then run to the end."""
    log: dict[int, tuple] = {}
    for k in kills:
        assert attempt(path, script, log, {k}) is None, f"not killed at step {k}"
    job = attempt(path, script, log)
    assert job is not None
    return job, log


def assert_same_run(path: Path, script: Script, kills: list[int], ref: EpochJob, ref_log: dict[int, tuple]) -> None:
    job, log = run_with_kills(path, script, kills)
    assert job.summary() == ref.summary(), f"kills {kills}: (epoch counter, scheduler epoch, loader) differ"
    assert log == ref_log, f"kills {kills}: the steps saw different epochs, learning rates or samples"
    assert job.counters.evals == ref.counters.evals, f"kills {kills}: the evaluations after the loop differ"
    assert job.state() == ref.state(), f"kills {kills}: final state differs"


def reference(path: Path, script: Script) -> tuple[EpochJob, dict[int, tuple]]:
    return run_with_kills(path, script, [])


# ------------------------------------------------------------------ exact resume around epoch ends


def test_epoch_counter_and_schedule_after_the_loop_survive_every_kill(tmp_path):
    ref, ref_log = reference(tmp_path / "ref", epoch_script)
    total = PER_EPOCH * EPOCHS
    assert ref.summary() == (EPOCHS, EPOCHS, (EPOCHS, 0)) and len(ref_log) == total
    assert [ref_log[s][1] for s in (1, 4, 7)] == [0.1, 0.05, 0.025]  # the schedule steps once per epoch
    # A kill after every step: at an epoch end right after its save (3, 6, 9: the last one too, where only the
    # code after the final loop is left) and mid-epoch (replayed from the previous epoch end's save).
    for k in range(1, total + 1):
        assert_same_run(tmp_path / f"kill{k}", epoch_script, [k], ref, ref_log)


def test_a_kill_at_every_epoch_end_in_one_run(tmp_path):
    ref, ref_log = reference(tmp_path / "ref", epoch_script)
    # Each relaunch resumes from the loader state the previous relaunch saved (itself restored from (e, D)).
    assert_same_run(tmp_path / "chain", epoch_script, [3, 6, 9], ref, ref_log)
    assert_same_run(tmp_path / "mixed", epoch_script, [2, 3, 5, 6, 9], ref, ref_log)


@pytest.mark.parametrize("total", [8, 6])  # ends mid-epoch; ends with a break after an epoch's last batch
def test_quickstart_pattern_with_break_survives_every_kill(tmp_path, total):
    script = quickstart_script(total)
    ref, ref_log = reference(tmp_path / "ref", script)
    if total == 6:
        # Left by break after epoch 1's last batch: the loop did not end, so the loader says so and the
        # per-epoch work in `else:` did not run.
        assert ref.summary() == (1, 1, (1, D))
    for k in range(1, total + 1):
        assert_same_run(tmp_path / f"kill{k}", script, [k], ref, ref_log)


def test_extending_a_run_that_broke_after_an_epochs_last_batch(tmp_path):
    # A finished run (break at step 6, epoch 1's last batch) relaunched with more steps continues as if it had
    # always been the longer run: its first loop ends epoch 1 (the `else:` runs), then epoch 2.
    ref, ref_log = reference(tmp_path / "ref", quickstart_script(9))
    log: dict[int, tuple] = {}
    short = attempt(tmp_path / "ext", quickstart_script(6), log)
    assert short is not None and short.summary() == (1, 1, (1, D))
    longer = attempt(tmp_path / "ext", quickstart_script(9), log)
    assert longer is not None
    assert longer.summary() == ref.summary() == (2, 2, (2, D))  # 9 also breaks after a last batch (epoch 2)
    assert log == ref_log and longer.state() == ref.state()


# ------------------------------------------------------------------ the loader's states, directly


def make(**kw) -> ResumableLoader:
    return ResumableLoader(AugDataset(N), batch_size=BS, seed=3, **kw)


def position(loader: ResumableLoader) -> tuple[int, int]:
    sd = json.loads(json.dumps(loader.state_dict()))
    assert (sd["epoch"], sd["cursor"]) == (loader.epoch, loader.consumed)
    return sd["epoch"], sd["cursor"]


def test_last_batch_delivered_until_the_loop_ends():
    loader = make()
    seen = []
    for _batch in loader:
        seen.append(position(loader))
    assert seen == [(0, 4), (0, 8), (0, D)]  # the last batch in hand: still epoch 0, all delivered
    assert position(loader) == (1, 0)  # code after the loop: the next epoch is begun
    assert len(loader) == PER_EPOCH


def test_restored_at_an_epochs_end_the_first_loop_is_empty():
    ref = make()
    ref_batches = [list(ref) for _ in range(2)]
    loader = make()
    loader.load_state_dict(json.loads(json.dumps({**ref.state_dict(), "epoch": 0, "cursor": D})))
    assert position(loader) == (0, D) and len(loader) == PER_EPOCH  # len: a full epoch, whatever the position
    assert list(loader) == [] and position(loader) == (1, 0)
    got = list(loader)
    assert len(got) == PER_EPOCH and all(torch.equal(a, b) for a, b in zip(got, ref_batches[1], strict=True))
    assert position(loader) == (2, 0)


def test_break_after_the_last_batch_then_the_next_loop_ends_the_epoch():
    loader = make()
    for _ in loader:
        if loader.consumed == D:
            break
    assert position(loader) == (0, D)
    ended = 0
    for _ in loader:
        raise AssertionError("an epoch whose last batch was delivered yields nothing more")
    else:
        ended += 1
    assert ended == 1 and position(loader) == (1, 0)
    assert len(list(loader)) == PER_EPOCH and position(loader) == (2, 0)


def test_holding_the_iterator_after_the_last_batch_ends_cleanly():
    loader = make()
    it = iter(loader)
    for _ in range(PER_EPOCH):
        next(it)
    sd = loader.state_dict()
    assert (sd["epoch"], sd["cursor"]) == (0, D)
    with pytest.raises(StopIteration):  # the same iterator's next next(): the loop ends, nothing more
        next(it)
    assert position(loader) == (1, 0)
    with pytest.raises(StopIteration):  # and stays ended
        next(it)
    assert position(loader) == (1, 0)


def test_iter_twice_at_an_epochs_end():
    ref = make()
    list(ref)
    epoch1 = list(ref)
    loader = make()
    loader.load_state_dict({**loader.state_dict(), "cursor": D})
    first, second = iter(loader), iter(loader)  # iter() alone moves nothing
    assert position(loader) == (0, D)
    with pytest.raises(RuntimeError, match="stale"):
        next(first)  # superseded: it must neither end this epoch nor start one
    assert position(loader) == (0, D)
    with pytest.raises(StopIteration):
        next(second)  # the newest one ends the epoch
    assert position(loader) == (1, 0)
    got = list(loader)
    assert len(got) == PER_EPOCH and all(torch.equal(a, b) for a, b in zip(got, epoch1, strict=True))


def test_epoch_without_any_batch():
    loader = ResumableLoader(AugDataset(3), batch_size=4, seed=3, drop_last=True)  # D = 0
    assert len(loader) == 0 and position(loader) == (0, 0)
    assert list(loader) == [] and position(loader) == (1, 0)  # still counted, no DataLoader iteration needed
    loader.load_state_dict(loader.state_dict())
    assert list(loader) == [] and position(loader) == (2, 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_end_position_with_drop_last(drop_last):
    loader = make(drop_last=drop_last)
    d = 8 if drop_last else D  # drop_last: the incomplete final global batch (2) is dropped
    # range first: zip stops when it runs out, after the last batch, without asking the loader for more.
    list(zip(range(len(loader)), loader, strict=False))
    assert position(loader) == (0, d)
    fresh = make(drop_last=drop_last)
    fresh.load_state_dict(loader.state_dict())
    assert list(fresh) == [] and position(fresh) == (1, 0)


# ------------------------------------------------------------------ version 1 (before epoch-end positions)


def test_version_1_state_keeps_its_old_meaning():
    loader = make()
    v2 = loader.state_dict()
    assert v2["version"] == 3
    # Version 1 reported an epoch's last batch as the next epoch's start: loaded as such, the first loop is
    # epoch 1 (the code after epoch 0's loop is skipped once, as that version did).
    ref = make()
    list(ref)
    epoch1 = list(ref)
    old = make()
    old.load_state_dict({**v2, "version": 1, "epoch": 1, "consumed": 0})
    got = list(old)
    assert len(got) == PER_EPOCH and all(torch.equal(a, b) for a, b in zip(got, epoch1, strict=True))
    assert position(old) == (2, 0)
    # A (hand-made) finished position in version 1 is normalised, as version 1 did; in version 2 it is kept.
    old.load_state_dict({**v2, "version": 1, "epoch": 4, "consumed": N})
    assert position(old) == (5, 0)
    old.load_state_dict({**v2, "version": 2, "epoch": 4, "consumed": N})  # version 2's D: 10 (no padding)
    assert position(old) == (4, D)
    # Mid-epoch positions mean the same in both versions.
    old.load_state_dict({**v2, "version": 1, "epoch": 2, "consumed": 4})
    assert position(old) == (2, 4) and len(list(old)) == 2
    for bad in (0, 4, True, "1", None):
        with pytest.raises(StateMismatch, match="version"):
            old.load_state_dict({**v2, "version": bad})
