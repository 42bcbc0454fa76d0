"""The per-step collective with real processes: any-of flags, and rank 0's metric values on every rank."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from ftrain.collectives import Collectives

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
