"""Multi-node launches on one host that need no training: the rendezvous store's absence is one clear error.

Node loss, rejoin and exactly-once samples are in test_elastic_chaos.py; the nodes are tests/cluster.py's.
"""
from __future__ import annotations

import socket
from pathlib import Path

import cluster
import pytest

from helpers import EXAMPLE

pytestmark = pytest.mark.slow


def test_missing_store_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = cluster.node(f"127.0.0.1:{port}", "nostore", tmp_path / "ckpt", [str(EXAMPLE), "--steps", "1"])
    assert node.wait(timeout=120) == 2
    assert f"cannot reach the rendezvous store at 127.0.0.1:{port}" in node.output
    assert f"ftrain rendezvous --host 127.0.0.1 --port {port}" in node.output
    assert "Traceback" not in node.output
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("step-*"))
