"""Buffers of replicated modules are written from rank 0; ``checkpoint.check_replicated`` finds diverged ranks.

In-process: the split (``snapshot.owners``), what ``Registry.capture`` reports, the checkpointer's use of both
on a rank other than 0, and the divergence check against a fake of the one collective it uses. The real thing
(DDP, BatchNorm, SIGKILL) is tests/integration/test_batchnorm.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import codec
from ftrain.checkpoint.format import REPLICATED
from ftrain.checkpoint.snapshot import owners
from ftrain.config import CheckpointConfig
from ftrain.errors import StateMismatch
from ftrain.session import replication
from ftrain.session.checkpointer import Checkpointer
from ftrain.session.collectives import Collectives
from ftrain.session.registry import Registry


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


# ------------------------------------------------------------------ owners
def test_owners_pins_the_given_names_to_rank_0_and_balances_the_rest() -> None:
    sizes = {"a": 100, "b": 90, "c": 80, "d": 70, "big.running_var": 500, "x.running_mean": 10}
    pinned = ["big.running_var", "x.running_mean", "not-a-tensor"]
    split = owners(sizes, 3, pinned)
    assert split.keys() == sizes.keys()  # a pinned name without a tensor is ignored
    assert split["big.running_var"] == 0 and split["x.running_mean"] == 0
    # Rank 0 already carries 510 bytes of pinned buffers: the rest balances across ranks 1 and 2 first.
    assert {n: split[n] for n in "abcd"} == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert owners(sizes, 3, pinned) == split == owners(dict(reversed(sizes.items())), 3, reversed(pinned))
    # Unpinned, the largest tensor would have gone to rank 0 and the buffer of 10 bytes elsewhere.
    assert owners(sizes, 3)["x.running_mean"] != 0
    assert owners(sizes, 1, pinned) == dict.fromkeys(sizes, 0)


def test_owners_without_pins_is_unchanged() -> None:
    sizes = {"w": 40, "v": 40, "u": 30, "t": 10}
    assert owners(sizes, 2) == owners(sizes, 2, ()) == {"v": 0, "w": 1, "u": 0, "t": 1}


# ------------------------------------------------------------------ capture
def test_capture_names_the_persistent_buffers_of_replicated_modules_only() -> None:
    model, other = cnn(), cnn()
    model.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in the state dict: not saved
    registry = Registry()
    registry.add("model", model, None)
    registry.add("mine", other, True)  # per-rank: each rank writes its own anyway
    registry.add("optimizer", torch.optim.SGD(model.parameters(), lr=0.1), None)
    replicated, per_rank, _, buffers = registry.capture(trainable_only=False)
    assert buffers == [f"{REPLICATED}/model/1.{b}" for b in ("num_batches_tracked", "running_mean", "running_var")]
    # The names are the codec's: each is a tensor of the encoded replicated tree.
    _, tensors = codec.encode(replicated, REPLICATED)
    assert set(buffers) <= tensors.keys()
    assert "mine" in per_rank and "mine" not in replicated


def test_a_rank_other_than_0_writes_no_pinned_buffer(tmp_path: Path) -> None:
    model = cnn()
    registry = Registry()
    registry.add("model", model, None)
    replicated, per_rank, _, buffers = registry.capture(trainable_only=False)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path)), Collectives(1, 2))  # rank 1 of 2; no collective runs
    tree, tensors = codec.encode(replicated, REPLICATED)
    written = ck._snapshot(1, tree, tensors, per_rank, buffers).index
    assert written and not set(buffers) & written.keys()
    unpinned = ck._snapshot(1, tree, tensors, per_rank, ()).index
    assert set(buffers) & unpinned.keys(), "the test model must have buffers that rank 1 would write unpinned"


# ------------------------------------------------------------------ the divergence check
class FakeRanks(Collectives):
    """Rank 0 of 2, the other rank's values given by a function of this rank's (the check's two calls)."""

    def __init__(self, other: list[list[int]]) -> None:
        super().__init__(0, 2)
        self.other = other
        self.calls: list[list[int]] = []

    def extremes(self, values: list[int]) -> tuple[list[int], list[int]]:
        theirs = self.other[len(self.calls)] if len(self.calls) < len(self.other) else values
        self.calls.append(values)
        return ([max(a, b) for a, b in zip(values, theirs, strict=True)],
                [min(a, b) for a, b in zip(values, theirs, strict=True)])


def replicated_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return codec.encode({"model": model.state_dict()}, REPLICATED)[1]


def test_the_check_names_the_first_differing_tensor_and_skips_pinned_buffers() -> None:
    ours = replicated_tensors(cnn())
    diverged = cnn()
    with torch.no_grad():
        diverged[4].weight.add_(1e-3)
        diverged[0].bias.add_(1e-3)
        diverged[1].running_mean.add_(1.0)  # a pinned buffer: differs by design under DDP
    skip = [n for n in ours if "running" in n or "num_batches" in n]
    names = sorted(set(ours) - set(skip))
    theirs = replicated_tensors(diverged)
    head = [0, len(names), replication._names_digest(names)]
    coll = FakeRanks([head, [replication.digest(theirs[n]) for n in names]])
    with pytest.raises(StateMismatch, match=r"step 7: replicated tensor 'replicated/model/0.bias' differs between "
                                            r"ranks \(2 of 6"):
        replication.check(coll, ours, skip, 7)
    # Only the buffers differ: nothing to report.
    buffers_only = cnn()
    with torch.no_grad():
        buffers_only[1].running_var.mul_(2.0)
    theirs = replicated_tensors(buffers_only)
    replication.check(FakeRanks([head, [replication.digest(theirs[n]) for n in names]]), ours, skip, 7)


def test_the_check_refuses_different_names_and_stands_down_when_a_rank_failed() -> None:
    ours = replicated_tensors(cnn())
    names = sorted(ours)
    with pytest.raises(StateMismatch, match="names of its tensors differ"):
        replication.check(FakeRanks([[0, len(names) - 1, 123]]), ours, (), 3)
    coll = FakeRanks([[1, 0, replication._names_digest([])]])  # the other rank's snapshot failed
    replication.check(coll, ours, (), 3)
    assert len(coll.calls) == 1, "no digest round after a failure: the save fails anyway"


def test_digest_sees_dtype_shape_and_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32)
    seen = {replication.digest(x) for x in (t, t.view(2, 3), t.to(torch.float64), t + 1, t.clone())}
    assert len(seen) == 4 and all(0 <= d < 1 << 63 for d in seen)


@pytest.mark.parametrize("on", [True, False])
def test_a_session_runs_the_check_at_each_save_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                on: bool) -> None:
    # One process cannot diverge from itself (the divergence is the fakes' business above): what this pins is that
    # checkpoint.check_replicated reaches the save path, with every replicated tensor and the pinned buffers.
    from helpers import cfg

    calls: list[tuple[set[str], set[str], int]] = []
    real = replication.check

    def spy(coll: Collectives, tensors: dict[str, torch.Tensor] | None, skip: list[str], step: int) -> None:
        calls.append((set(tensors or {}), set(skip), step))
        real(coll, tensors, skip, step)

    monkeypatch.setattr(replication, "check", spy)
    model = cnn()
    session = ftrain.Session(cfg(tmp_path, check_replicated=on, async_save=False))
    session.register(model=model)
    session.restore()
    session.save(1)
    session.close()
    if not on:
        assert calls == []
        return
    [(names, skip, step)] = calls
    assert step == 1 and set(replicated_tensors(model)) <= names
    assert skip == {n for n in replicated_tensors(model) if "running" in n or "num_batches" in n}
