"""Restore as a transaction across real ranks: damage or a mismatch seen by one rank only decides for all.

Two gloo processes (``torch.multiprocessing``) save steps 10 and 20; then rank
1's own state at step 20 is damaged, or rank 1's per-rank module no longer
fits. Rank 0 sees nothing wrong in either case: the ranks must still agree,
fall back together (damage) or all raise with their objects untouched
(mismatch).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ftrain
from ftrain.checkpoint import format as fmt
from ftrain.config import CheckpointConfig, FtrainConfig

from helpers import reseal_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _objects(rank: int, wide: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 2)
    own = torch.nn.Linear(2, 4 if wide else 2)  # per rank: each rank trains its own copy
    return shared, own, torch.optim.SGD([*shared.parameters(), *own.parameters()], lr=0.1)


def _state(*objs: object) -> str:
    return ftrain.state_sha256([(str(i), o.state_dict()) for i, o in enumerate(objs)])  # type: ignore[attr-defined]


def _worker(rank: int, store: str, ckpt: str, out: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    shared, own, opt = _objects(rank, wide=(phase == "mismatch" and rank == 1))
    session = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=ckpt, every_steps=10)))
    session.register(shared=shared, optimizer=opt)
    session.register(own=own, per_rank=True)
    result: dict[str, object] = {"before": _state(shared, own, opt)}
    try:
        step = session.restore()
        result["step"] = step
        if phase == "train":
            for s in range(step + 1, 21):
                loss = (own(shared(torch.randn(4, 3))) ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                session.step(s)
    except ftrain.FtrainError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["after"] = _state(shared, own, opt)
    session.close()
    Path(out, f"{phase}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(tmp_path: Path, phase: str) -> list[dict[str, object]]:
    store = tmp_path / f"store-{phase}"
    mp.spawn(_worker, args=(str(store), str(tmp_path / "ckpt"), str(tmp_path), phase), nprocs=2, join=True)
    return [json.loads((tmp_path / f"{phase}-rank{r}.json").read_text()) for r in (0, 1)]


def _damage_rank1(ckpt: Path, step: int) -> None:
    """Rank 1's own tree at ``step``: its per-rank module's weight becomes a number (ill-typed), resealed."""
    d = ckpt / fmt.step_dirname(step)
    name = fmt.shard_names(1)[0]
    record = json.loads((d / name).read_bytes())
    record["trees"][fmt.rank_key(1)]["own"]["weight"] = 3
    reseal_file(d, name, json.dumps(record).encode())


def test_damage_on_one_rank_makes_every_rank_fall_back(tmp_path: Path) -> None:
    _run(tmp_path, "train")
    _damage_rank1(tmp_path / "ckpt", 20)
    results = _run(tmp_path, "restore")
    assert [r.get("step") for r in results] == [10, 10], results


def test_a_mismatch_on_one_rank_raises_on_every_rank_and_changes_nothing(tmp_path: Path) -> None:
    _run(tmp_path, "train")
    results = _run(tmp_path, "mismatch")
    assert all("StateMismatch" in str(r.get("error")) for r in results), results
    assert "module 'own': bias is [2] float32 in the checkpoint but [4] float32" in str(results[1]["error"])
    assert all(r["before"] == r["after"] for r in results), "a refused restore changed the registered objects"
