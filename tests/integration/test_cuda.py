"""CUDA paths: GPU tensors in checkpoints and the CUDA RNG streams. Skipped on machines without a GPU (CI)."""
from __future__ import annotations

import pytest
import torch

import ftrain
from ftrain.config import CheckpointConfig, FtrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def train(model, opt, n):
    for _ in range(n):
        x = torch.randn(16, 32, device="cuda")  # CUDA RNG
        loss = model(x).square().mean()  # dropout: CUDA RNG
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_gpu_state_and_cuda_rng_resume_exactly(tmp_path):
    cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path)))
    model, opt = make()
    s = ftrain.Session(cfg)
    s.register(model=model, optimizer=opt)
    assert s.restore() == 0
    train(model, opt, 5)
    s.save(5)  # asynchronous: a pinned staging buffer, copies ordered by a CUDA event
    staging = s._checkpointer.arena._buf
    assert staging is not None and staging.is_pinned()
    train(model, opt, 7)  # keeps mutating the GPU tensors while the background writer persists the snapshot
    s.close()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_rng = torch.cuda.get_rng_state()

    model2, opt2 = make()
    train(model2, opt2, 3)  # scramble the CUDA RNG and weights before restoring
    s2 = ftrain.Session(cfg)
    s2.register(model=model2, optimizer=opt2)
    assert s2.restore() == 5
    assert all(v.is_cuda for st in opt2.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    train(model2, opt2, 7)
    assert torch.equal(torch.cuda.get_rng_state(), ref_rng)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_snapshot_is_taken_before_training_continues(tmp_path):
    """The bytes on disk are the state at save time, not values updated while the writer ran."""
    cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path)))
    w = torch.nn.Parameter(torch.zeros(64 << 20, device="cuda"))  # 256 MiB: the write takes a while
    holder = torch.nn.ParameterDict({"w": w})
    s = ftrain.Session(cfg)
    s.register(model=holder)
    s.restore()
    s.save(1)
    with torch.no_grad():
        w.fill_(7.0)  # immediately after save() returns
    s.close()
    back = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.ones(64 << 20, device="cuda"))})
    s2 = ftrain.Session(cfg)
    s2.register(model=back)
    assert s2.restore() == 1
    assert torch.count_nonzero(back["w"]).item() == 0


def test_trainable_only_on_gpu_fingerprints_like_cpu_and_resumes_exactly(tmp_path):
    from ftrain.session import trainable

    big = torch.randn(3, (64 << 20) // 4 // 3 + 5)  # more than one 64 MiB hashing chunk, odd length
    assert trainable.param_digest(big.cuda()) == trainable.param_digest(big)
    cfg = FtrainConfig(checkpoint=CheckpointConfig(dir=str(tmp_path), trainable_only=True))
    model, _ = make()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    session = ftrain.Session(cfg)
    session.register(model=model, optimizer=opt)
    session.restore()
    train(model, opt, 3)
    session.save(3, blocking=True)
    train(model, opt, 2)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model2, _ = make()
    model2[0].requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-3)
    s2 = ftrain.Session(cfg)
    s2.register(model=model2, optimizer=opt2)
    assert s2.restore() == 3
    train(model2, opt2, 2)
    for k, v in ref.items():
        assert torch.equal(model2.state_dict()[k], v), k
