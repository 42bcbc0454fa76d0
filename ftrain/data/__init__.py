"""Worker side: resumable, deterministic data loading (inside each training process and its DataLoader workers).

``sampler`` (the per-rank order of an epoch), ``seeding`` (per-sample RNG
seeds), ``loader`` (the DataLoader wrapper whose position is checkpointed).
"""
from __future__ import annotations

from ftrain.data.loader import ResumableLoader
from ftrain.data.sampler import ResumableSampler
from ftrain.data.seeding import SeededDataset, derive_seed

__all__ = ["ResumableLoader", "ResumableSampler", "SeededDataset", "derive_seed"]
