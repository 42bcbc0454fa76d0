"""ftrain.data with DataLoader worker processes: workers reproduce the main process exactly, leave the global
RNG alone, ignore the preemption signals and chain the user's worker_init_fn."""
from __future__ import annotations

import signal

import pytest
import torch
from torch.utils.data import Dataset

from ftrain.data import ResumableLoader

from helpers import AugDataset, check_resume, collect_batches

pytestmark = pytest.mark.slow

_USER_INIT_RAN = False


def _user_init(worker_id: int) -> None:
    global _USER_INIT_RAN
    _USER_INIT_RAN = True


class WorkerProbe(Dataset):
    """Reports, from inside the worker, the SIGTERM/SIGINT disposition and the user init flag."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        ign = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
        in_worker = torch.utils.data.get_worker_info() is not None
        return torch.tensor([i, in_worker, *ign, _USER_INIT_RAN], dtype=torch.int64)


def test_resume_with_workers():
    n, bs = 37, 5
    make = lambda: ResumableLoader(AugDataset(n), batch_size=bs, seed=2, num_workers=2)  # noqa: E731
    ref = check_resume(make, 20, [8, 11])
    # Workers reproduce exactly what the main process computes.
    single, _ = collect_batches(ResumableLoader(AugDataset(n), batch_size=bs, seed=2), 20)
    assert all(torch.equal(a, b) for a, b in zip(ref, single))


def test_resume_persistent_workers():
    make = lambda: ResumableLoader(  # noqa: E731
        AugDataset(23), batch_size=4, seed=9, num_workers=2, persistent_workers=True
    )
    check_resume(make, 15, [7])


def test_global_rng_untouched_with_workers_and_raw_dataset():
    torch.manual_seed(0)
    t = torch.get_rng_state()
    for _ in ResumableLoader(AugDataset(20), batch_size=3, seed=5, num_workers=2):
        pass
    assert torch.equal(torch.get_rng_state(), t)
    # Raw dataset in workers: the base seed comes from the private generator.
    for _ in ResumableLoader(AugDataset(20), batch_size=3, seed=5, seed_samples=False, num_workers=2):
        pass
    assert torch.equal(torch.get_rng_state(), t)


def test_worker_signals_ignored_and_user_init_chained():
    loader = ResumableLoader(WorkerProbe(), batch_size=4, num_workers=2, worker_init_fn=_user_init, shuffle=False)
    rows = torch.cat(list(loader))
    assert rows[:, 0].tolist() == list(range(8))
    assert rows[:, 1:].eq(1).all(), rows
    # The main process's handlers are not changed.
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
