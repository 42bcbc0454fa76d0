"""The per-step collective with real processes: any-of flags, and rank 0's metric values on every rank."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ftrain.session.collectives import Collectives

pytestmark = pytest.mark.slow

#: Per rank: what it reports. Rank 1 disagrees everywhere (and alone raises a flag); rank 0's word must win,
#: including "not reported", NaN (which MAX cannot carry) and -inf (which the others send as filler).
REPORTS = {0: [0.5, None, math.nan, -math.inf, math.inf], 1: [9.0, 3.0, 1.0, 2.0, None]}
FLAGS = {0: (False, False), 1: (True, False)}


def _worker(rank: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    coll = Collectives(rank, 2)
    coll.setup()
    flags, values = coll.agree(FLAGS[rank], REPORTS[rank])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"flags": flags, "values": [repr(v) for v in values]}))
    dist.destroy_process_group()


def test_agree_gives_every_rank_the_same_flags_and_rank_0_values(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["flags"] == [True, False]
    assert results[0]["values"] == ["0.5", "None", "nan", "-inf", "inf"]


def _report_on_rank0_then_save(rank: int, store_path: str, ckpt: str, monitor: str) -> None:
    import torch

    import ftrain
    from ftrain.config import CheckpointConfig, FtrainConfig, SelectionConfig

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    session = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=ckpt, every_steps=2, selection=SelectionConfig(monitor=monitor))))
    session.register(model=model)
    session.restore()
    session.step(1)
    session.step(2)  # saves step 2 on the schedule
    if rank == 0:  # a final evaluation on rank 0 only, then every rank saves the same step
        session.report(val_loss=0.25, val_acc=0.5)
    session.save(2)  # must not leave rank 0 alone in a collective (it saves step 2 again, with the metrics)
    session.step(3)
    session.close()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("monitor", ["", "val_acc"])
def test_a_report_on_rank_0_only_before_save_does_not_hang(tmp_path: Path, monitor: str) -> None:
    from ftrain.checkpoint.store import CheckpointStore

    mp.spawn(_report_on_rank0_then_save, args=(str(tmp_path / "store"), str(tmp_path / "ck"), monitor), nprocs=2,
             join=True)
    meta = CheckpointStore(tmp_path / "ck").validate(2).meta
    assert meta["metrics"] == {"val_loss": 0.25, "val_acc": 0.5}
