"""Fixtures shared by both tiers. Shared helpers (functions, classes) are in helpers.py."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_servers import S3Server, s3_server


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server (moto) on 127.0.0.1, behind a fault-injecting proxy; one per test module."""
    with s3_server() as server:
        yield server


@pytest.fixture
def remote(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket URL, this process's AWS environment pointed at the proxy in front of the server."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3.proxy.inject(errors=0, drops=0, seen=[])
    return f"s3://{s3.make_bucket()}/runs/exp"
