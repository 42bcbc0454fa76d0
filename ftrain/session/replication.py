"""Worker side: ``checkpoint.check_replicated``, the optional check that replicated state is the same on every rank.

A replicated object is written once in total, its tensors split across the
ranks (``snapshot.owners``). If the ranks' copies have silently diverged (a
parameter updated outside DDP, an optimizer stepped on one rank only), the
checkpoint mixes ranks and matches none of them, and so does every later one.
With the check on, each save digests every replicated tensor on every rank and
the ranks compare the digests; a difference raises :class:`StateMismatch` on
every rank, naming the first differing tensor in sorted order. Raising rather
than logging: once replicated state is not replicated, no checkpoint of it can
be right, so training on would only produce more wrong checkpoints.

The buffers of replicated modules are left out: under DDP they differ between
ranks by design (each rank updates BatchNorm's running statistics from its own
batch; DDP broadcasts rank 0's at the next forward) and are written from rank 0.

Collective: every rank calls :func:`check` at the same save, including a rank
whose snapshot failed (it passes ``None``), so no rank is left waiting.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import xxhash

from ftrain.checkpoint import codec
from ftrain.errors import StateMismatch
from ftrain.session.collectives import Collectives

#: Digests are kept to 63 bits so that their negation fits an int64 (one MAX all-reduce gives max and min).
_MASK = (1 << 63) - 1


def digest(tensor: torch.Tensor) -> int:
    """XXH3-64 of a tensor's dtype, shape and bytes, as a non-negative 63-bit int (a CUDA tensor is copied first)."""
    h = xxhash.xxh3_64()
    h.update(f"{codec.dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
    h.update(codec.tensor_bytes(tensor.detach().cpu()))
    return h.intdigest() & _MASK


def _names_digest(names: list[str]) -> int:
    return xxhash.xxh3_64_intdigest("\0".join(names).encode()) & _MASK


def check(coll: Collectives, tensors: Mapping[str, torch.Tensor] | None, skip: Collection[str], step: int) -> None:
    """Raise :class:`StateMismatch` on every rank if a replicated tensor (outside ``skip``) differs across ranks.

    ``tensors``: this rank's replicated tensors as the codec names them; None on a rank that failed before the
    check (then no rank checks: the save fails anyway, and the caller reports why). Two collectives: the
    names (so the digest vectors line up), then one digest per tensor.
    """
    names = sorted(set(tensors) - set(skip)) if tensors is not None else []
    high, low = coll.extremes([int(tensors is None), len(names), _names_digest(names)])
    if high[0]:
        return
    if high[1:] != low[1:]:
        raise StateMismatch(f"checkpoint step {step}: the ranks register different replicated state (the names "
                            "of its tensors differ between ranks); register the same objects on every rank")
    assert tensors is not None
    values = [digest(tensors[n]) for n in names]
    high, low = coll.extremes(values)
    differing = [n for n, hi, lo in zip(names, high, low, strict=True) if hi != lo]
    if differing:
        raise StateMismatch(
            f"checkpoint step {step}: replicated tensor {differing[0]!r} differs between ranks "
            f"({len(differing)} of {len(names)} replicated tensors differ); replicated state must be identical on "
            "every rank (DDP keeps a wrapped model's parameters in step; a parameter or optimizer changed outside "
            "it, or on some ranks only, is not). Register per-rank state with per_rank=True "
            "(checkpoint.check_replicated)")
