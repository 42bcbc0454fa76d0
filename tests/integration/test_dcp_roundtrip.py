"""DCP interop with a sharded checkpoint: a 2-rank FSDP2 run saves (format 3, sharded chunks),
``ftrain ckpt export --format dcp`` writes it as one DCP directory of whole tensors, DCP's own load reads them,
and ``load_pretrained`` reshards them into a 2-rank FSDP2 model: all bit for bit the trained model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ftrain.cli import main as cli

from helpers import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

SCRIPTS = Path(__file__).parent / "scripts"


def test_sharded_checkpoint_to_dcp_and_back_into_fsdp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, saved, out = tmp_path / "ckpt", tmp_path / "saved.safetensors", tmp_path / "dcp"
    run = torchrun(SCRIPTS / "fsdp_reshard.py", [str(ckpt), "--train", "3", "--dump-saved", str(saved)],
                   nproc=2, check=True)
    assert "world=2" in run.stdout
    manifest = next(ckpt.glob("step-*/manifest.json")).read_text()
    assert '"sharded"' in manifest  # the checkpoint really holds sharded chunks, not whole tensors
    # In process (the CLI's own entry point): a third interpreter start would cost seconds on a busy machine.
    assert cli(["ckpt", "export", str(ckpt), str(out), "--format", "dcp"]) == 0
    assert "exported step 3 object 'model'" in capsys.readouterr().out

    expected = {k.removeprefix("model/"): v for k, v in load_file(str(saved)).items() if k.startswith("model/")}
    assert set(dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata) == set(expected)
    target = {k: torch.empty_like(v) for k, v in expected.items()}
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    for k, v in expected.items():
        assert torch.equal(target[k], v), f"DCP tensor {k} differs from the trained model's"

    loaded = tmp_path / "loaded.safetensors"
    run = torchrun(SCRIPTS / "dcp_load_fsdp.py", [str(out), str(loaded)], nproc=2, check=True)
    assert run.stdout.count(f"loaded={len(expected)} ok=True sharded=True") == 2, run.stdout
    got = {k.removeprefix("model/"): v for k, v in load_file(str(loaded)).items()}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k} differs after load_pretrained under FSDP2"
