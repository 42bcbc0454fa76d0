"""Worker side: capture and restore every random-number stream a training step may draw from, per rank.

Streams: Python ``random``, NumPy's global generator (when NumPy is installed),
torch's CPU generator and every CUDA device's generator (when CUDA is
available). The state is a plain tree (tuples, ints, tensors) that
``checkpoint.codec`` stores without pickle.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, cast

import torch

from ftrain.checkpoint.content import RNG_VERSION
from ftrain.errors import StateMismatch

log = logging.getLogger("ftrain")

#: The layout of the state :func:`capture` writes: defined with the checks of it (``checkpoint/content.py``).
VERSION = RNG_VERSION

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None  # type: ignore[assignment]


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {"version": VERSION, "python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached = cast(tuple[str, Any, int, int, float], np.random.get_state(legacy=True))
        state["numpy"] = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
    # Only once CUDA is in use: asking earlier would initialise CUDA in CPU-only processes (e.g. a CPU job on a
    # GPU node), and a process that has not touched CUDA still has the default streams restore() recreates.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def resize_seed(saved: dict[str, Any], step: int, rank: int) -> int:
    """The seed of rank ``rank``'s streams in a run resumed at another world size from checkpoint ``step``.

    Per-rank streams cannot be mapped onto another number of ranks, so each new
    rank gets streams derived from (seed, step, rank), never the same on two
    ranks. The seed is a digest of the saving rank 0's torch generator state
    (``saved``, as loaded): distinct per run and per checkpoint, and the same
    checkpoint resumed twice at the same new world size draws the same numbers.
    """
    from ftrain.data.seeding import derive_seed

    state = saved["torch"]
    digest = hashlib.sha256(state.to(torch.uint8).contiguous().numpy().tobytes()).digest()
    return derive_seed(int.from_bytes(digest[:8], "little"), step, rank)


def reseed(seed: int) -> None:
    """Seed every stream :func:`capture` covers from one 64-bit ``seed`` (Python, NumPy, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too
    if np is not None:
        np.random.seed(seed % 2**32)


def restore(state: dict[str, Any]) -> None:
    if state.get("version") != VERSION:
        raise StateMismatch(f"rng: saved state version {state.get('version')!r}, this ftrain reads {VERSION}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "numpy" in state:
        if np is None:
            log.warning("rng: the checkpoint has NumPy RNG state but NumPy is not installed; the resumed run "
                        "will not be bit-exact if it draws NumPy random numbers")
        else:
            s = state["numpy"]
            np.random.set_state((s["kind"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                                 s["cached_gaussian"]))
    saved_cuda = state.get("cuda")
    if saved_cuda is not None and not torch.cuda.is_available():
        log.warning("rng: the checkpoint has CUDA RNG state but CUDA is not available; the resumed run is not "
                    "bit-exact with the original GPU run")
    elif saved_cuda is not None:
        if len(saved_cuda) != torch.cuda.device_count():
            raise StateMismatch(f"rng.cuda: saved for {len(saved_cuda)} CUDA device(s), this process sees "
                                f"{torch.cuda.device_count()}; set CUDA_VISIBLE_DEVICES as in the original run")
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in saved_cuda])
