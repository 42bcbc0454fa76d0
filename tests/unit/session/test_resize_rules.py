"""Which checkpoints of another world size a run takes (Registry's layout check), without processes."""
from __future__ import annotations

import pytest
import torch

import ftrain
from ftrain.checkpoint.manifest import Manifest
from ftrain.data import ResumableLoader
from ftrain.errors import StateMismatch
from ftrain.session import rng
from ftrain.session.registry import Registry, resize_mode


class Tokens:
    """A per-rank object without a resize hook (its state means something only on its own rank)."""

    def state_dict(self) -> dict:
        return {"seen": 3}

    def load_state_dict(self, state: dict) -> None:
        pass


def registry(**objects: tuple[object, bool | None]) -> Registry:
    reg = Registry()
    for key, (obj, per_rank) in objects.items():
        reg.add(key, obj, per_rank)
    return reg


def manifest(world_size: int, reg: Registry) -> Manifest:
    """The layout part of a manifest: only its step, world size and object names matter here."""
    rep = sorted(k for k, (_, p) in reg.objects.items() if not p)
    own = sorted(k for k, (_, p) in reg.objects.items() if p)
    return Manifest(step=40, world_size=world_size, files={}, tensors={}, meta={"replicated": rep, "per_rank": own})


def test_refused_unless_on_resize_is_resume():
    reg = registry(model=(torch.nn.Linear(2, 2), None), loader=(ResumableLoader(range(8), batch_size=2), None))
    m = manifest(4, reg)
    with pytest.raises(StateMismatch, match=r"written by 4 rank\(s\); this run has 2\. Relaunch with 4 processes, or "
                                            r"set checkpoint\.on_resize: resume"):
        reg.check(m, None, 0, 2, False, on_resize="refuse")
    reg.check(m, None, 0, 2, False, on_resize="resume")  # the loader has its hook: accepted
    reg.check(m, None, 0, 4, False, on_resize="refuse")  # the same world size: no question


def test_a_per_rank_object_without_a_hook_is_named():
    reg = registry(model=(torch.nn.Linear(2, 2), None), tokens=(Tokens(), True),
                   loader=(ResumableLoader(range(8), batch_size=2), None))
    with pytest.raises(StateMismatch, match=r"per-rank object\(s\) \['tokens'\] have no resize_state"):
        reg.check(manifest(2, reg), None, 0, 1, False, on_resize="resume")
    # Registered as replicated it carries over as is.
    reg = registry(tokens=(Tokens(), False), counters=(ftrain.Counters(n=1), None))
    reg.check(manifest(2, reg), None, 0, 1, False, on_resize="resume")


def test_auto_resumes_only_under_an_elastic_launch(monkeypatch):
    monkeypatch.delenv("FTRAIN_ELASTIC", raising=False)
    assert resize_mode("auto") == "refuse"
    monkeypatch.setenv("FTRAIN_ELASTIC", "1")
    assert resize_mode("auto") == "resume" and resize_mode("refuse") == "refuse"


def test_resized_streams_differ_per_rank_and_repeat_per_checkpoint():
    saved = rng.capture()
    seeds = [rng.resize_seed(saved, 40, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rng.resize_seed(saved, 40, r) for r in range(4)]
    assert rng.resize_seed(saved, 41, 0) != seeds[0]
    draws = []
    for s in seeds[:2]:
        rng.reseed(s)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])
    rng.reseed(seeds[0])
    assert torch.equal(torch.rand(3), draws[0])
