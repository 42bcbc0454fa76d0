"""Fixtures shared by both tiers. Shared helpers (functions, classes) are in helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"
