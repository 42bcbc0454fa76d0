"""The loader's global cursor: a run resumed at another world size consumes the same samples at every global step.

No processes: each "rank" is a loader built with ``num_replicas``/``rank``; a resize is every old rank's
``state_dict()`` passed through ``resize_state`` into the new ranks' loaders, as ``Session.restore`` does.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.data import ResumableLoader
from ftrain.data.batching import plan_batches
from ftrain.errors import StateMismatch, UsageError


class Indices:
    """A dataset whose sample is its index (so batches name the samples consumed)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def ranks(n: int, world: int, global_batch: int, *, max_micro: int | None = None, drop_last: bool = False,
          seed: int = 7) -> list[ResumableLoader]:
    plan = plan_batches(global_batch, world, max_micro)
    return [ResumableLoader(Indices(n), **plan.loader_args(), seed=seed, drop_last=drop_last, num_replicas=world,
                            rank=r, seed_samples=False, collate_fn=list) for r in range(world)]


class Job:
    """All ranks of one attempt, stepping in lockstep: one global step = ``accumulation`` batches per rank."""

    def __init__(self, loaders: list[ResumableLoader]) -> None:
        self.loaders = loaders
        self.iters: list | None = None  # made at the first step: a load_state_dict() invalidates older ones

    def step(self) -> list[int] | None:
        """The samples of the next global step over all ranks, or None at the epoch's end (every rank's loop ran
        out at the same point)."""
        if self.iters is None:
            self.iters = [iter(x) for x in self.loaders]
        out: list[int] = []
        ended = []
        for loader, it in zip(self.loaders, self.iters, strict=True):
            for _ in range(loader.accumulation):
                batch = next(it, None)
                ended.append(batch is None)
                out += batch or []
        assert len(set(ended)) == 1, "the ranks' loops must end together"
        return None if ended[0] else out

    def new_epoch(self) -> None:
        self.iters = None

    def states(self) -> list[dict]:
        return [json.loads(json.dumps(x.state_dict())) for x in self.loaders]


def run(n: int, schedule: list[tuple[int, int]], global_batch: int, *, epochs: int = 2, drop_last: bool = False,
        max_micro: int | None = None) -> list[tuple[int, list[int]]]:
    """Train ``epochs`` epochs, switching world size as ``schedule`` says: ``[(world, steps), ...]`` (the last
    runs to the end). Returns (epoch, sorted samples) per global step."""
    log: list[tuple[int, list[int]]] = []
    states: list[dict] | None = None
    plan = list(schedule)
    while True:
        world, steps = plan.pop(0) if plan else (schedule[-1][0], 10**9)
        job = Job(ranks(n, world, global_batch, max_micro=max_micro, drop_last=drop_last))
        if states is not None:  # as Session.restore routes per-rank state: its own, or after a resize the hook's
            for r, loader in enumerate(job.loaders):
                loader.load_state_dict(states[r] if len(states) == world
                                       else ResumableLoader.resize_state(states, world, r))
        done = 0
        while done < steps:
            epoch = job.loaders[0].epoch
            if epoch >= epochs:
                return log
            samples = job.step()
            if samples is None:
                job.new_epoch()
                continue
            log.append((epoch, sorted(samples)))
            done += 1
        states = job.states()  # a checkpoint at an optimizer step; the next attempt resumes from it


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_global_step_holds_the_same_samples_at_any_world_size(drop_last):
    n, gb = 37, 8
    ref = run(n, [(1, 10**9)], gb, drop_last=drop_last)
    for world in (2, 4, 8):
        assert run(n, [(world, 10**9)], gb, drop_last=drop_last) == ref, f"world {world}"
    # Each epoch: every sample once, plus (without drop_last) the padding from the epoch's start.
    epoch0 = Counter(i for e, s in ref if e == 0 for i in s)
    if drop_last:
        assert len(epoch0) == 32 and set(epoch0.values()) == {1}
    else:
        assert set(epoch0) == set(range(n)) and sum(epoch0.values()) == 40


def test_resize_4_2_4_keeps_each_steps_samples_and_consumes_each_sample_once():
    n, gb = 64, 8  # divisible: every sample exactly once per epoch
    ref = run(n, [(4, 10**9)], gb)
    got = run(n, [(4, 3), (2, 5), (4, 10**9)], gb)
    assert got == ref
    for e in (0, 1):
        assert sorted(i for ep, s in got if ep == e for i in s) == list(range(n))


def test_resize_with_accumulation_at_the_smaller_world():
    # 8 per step: 4 ranks x 2, then 2 ranks x (2 batches of 2): the memory bound forces accumulation.
    ref = run(40, [(4, 10**9)], 8, max_micro=2)
    assert run(40, [(4, 2), (2, 3), (1, 2), (4, 10**9)], 8, max_micro=2) == ref


@settings(max_examples=int(os.environ.get("FTRAIN_FUZZ_EXAMPLES", "60")), deadline=None)
@given(n=st.integers(0, 50), gb_per=st.sampled_from([1, 2, 3]), drop_last=st.booleans(),
       schedule=st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 6)), min_size=1, max_size=5))
def test_any_resize_schedule_matches_the_uninterrupted_run(n, gb_per, drop_last, schedule):
    gb = 4 * gb_per  # divisible by every world size drawn
    assert run(n, schedule, gb, drop_last=drop_last, epochs=2) == run(n, [(4, 10**9)], gb, drop_last=drop_last)


def test_a_resize_from_the_middle_of_a_global_step_is_refused():
    # 16 per step over 4 ranks: 4 per rank, as 2 batches of 2.
    old = [ResumableLoader(Indices(32), batch_size=2, global_batch_size=16, num_replicas=4, rank=r, seed_samples=False,
                           collate_fn=list) for r in range(4)]
    assert old[0].accumulation == 2
    for x in old:
        next(iter(x))  # one batch of two: half a global step
    states = [x.state_dict() for x in old]
    new = ResumableLoader(Indices(32), batch_size=4, global_batch_size=16, num_replicas=2, rank=0, seed_samples=False)
    with pytest.raises(StateMismatch, match="inside a global step"):
        new.load_state_dict(ResumableLoader.resize_state(states, 2, 0))
    # The same world size resumes mid-step as before (the exact per-rank position).
    same = ResumableLoader(Indices(32), batch_size=2, global_batch_size=16, num_replicas=4, rank=1, seed_samples=False)
    same.load_state_dict(states[1])
    assert same.consumed == 2


def test_ranks_that_disagree_are_named():
    states = [x.state_dict() for x in ranks(32, 2, 8)]
    states[1] = {**states[1], "cursor": 8}
    with pytest.raises(StateMismatch, match="rank 1 saved cursor=8"):
        ResumableLoader.resize_state(states, 4, 0)


def test_a_changed_global_batch_is_refused_unless_the_plan_allows_it():
    old = Job(ranks(64, 4, 8))
    for _ in range(2):
        old.step()
    states = old.states()
    wrong = ResumableLoader(Indices(64), batch_size=4, num_replicas=2, rank=0, seed=7, seed_samples=False)  # gb 8
    wrong.load_state_dict(ResumableLoader.resize_state(states, 2, 0))  # 2 x 4 = 8: the same global batch
    other = ResumableLoader(Indices(64), batch_size=2, num_replicas=3, rank=0, seed=7, seed_samples=False)  # gb 6
    with pytest.raises(StateMismatch, match="'global_batch_size': saved 8, current 6"):
        other.load_state_dict(ResumableLoader.resize_state(states, 3, 0))
    # Under on_uneven_batch: nearest the loader re-stripes from the cursor: each sample still once per epoch.
    plan = plan_batches(8, 3, on_uneven="nearest")
    assert (plan.global_batch, plan.per_rank, plan.adjusted) == (6, 2, True)
    new = Job([ResumableLoader(Indices(64), **plan.loader_args(), num_replicas=3, rank=r, seed=7, seed_samples=False,
                               collate_fn=list) for r in range(3)])
    for r, x in enumerate(new.loaders):
        x.load_state_dict(ResumableLoader.resize_state(states, 3, r))
    seen: list[int] = []
    while (s := new.step()) is not None:
        seen += s
    first = [i for r in range(4) for i in ranks(64, 4, 8)[r].sampler.indices(0)[:4]]  # the 2 steps taken
    assert sorted(seen + first) == list(range(64))  # 48 left: 8 steps of 6, no padding


def test_batch_plan():
    p = plan_batches(32, 4)
    assert (p.micro_batch, p.accumulation, p.per_rank) == (8, 1, 8)
    p = plan_batches(32, 2, max_micro_batch=8)
    assert (p.micro_batch, p.accumulation) == (8, 2)
    p = plan_batches(24, 2, max_micro_batch=5)  # per rank 12: the largest divisor <= 5 is 4
    assert (p.micro_batch, p.accumulation, p.global_batch) == (4, 3, 24)
    with pytest.raises(UsageError, match=r"32 cannot be split evenly over 3 ranks \(world sizes that can: 1, 2, 4, 8"):
        plan_batches(32, 3)
    with pytest.raises(UsageError, match="max_micro_batch"):
        plan_batches(32, 4, max_micro_batch=0)
    assert plan_batches(32, 3, on_uneven="nearest").global_batch == 30
