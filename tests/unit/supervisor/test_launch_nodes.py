"""`ftrain launch` multi-node flag handling (ftrain/cli/launch.py) and the attempt files' worker-group fields."""
from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import pytest

from ftrain.attempt import AttemptFiles, HeartbeatWriter
from ftrain.cli import build_parser
from ftrain.cli.launch import RDZV_CONF_DEFAULTS, _check_multinode, _nnodes, _rdzv_conf
from ftrain.errors import UsageError


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["launch", *argv, "train.py"])


def test_nnodes_forms() -> None:
    assert _nnodes(None) == (1, 1) and _nnodes("2") == (2, 2) and _nnodes("1:3") == (1, 3)
    for bad in ("x", "3:1", "0:2", "1:"):
        with pytest.raises(UsageError, match="--nnodes"):
            _nnodes(bad)


def test_rdzv_conf_is_ours_with_the_users_keys_winning() -> None:
    conf = dict(kv.split("=") for kv in _rdzv_conf("last_call_timeout=2,join_timeout=60", external=True).split(","))
    assert conf == {**RDZV_CONF_DEFAULTS, "is_host": "false", "last_call_timeout": "2", "join_timeout": "60"}
    assert "is_host" not in _rdzv_conf(None, external=False)
    with pytest.raises(UsageError, match="key=value"):
        _rdzv_conf("oops", external=True)


@pytest.mark.parametrize("argv, missing", [
    (["--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:1"], "--rdzv-id"),
    (["--nnodes", "1:2", "--rdzv-id", "x"], "--rdzv-endpoint"),
    (["--nnodes", "2"], "--rdzv-id and --rdzv-endpoint"),
])
def test_multinode_needs_an_id_and_an_endpoint(argv: list[str], missing: str) -> None:
    with pytest.raises(UsageError, match=f"needs {missing}"):
        _check_multinode(args(*argv), _nnodes(argv[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_store_names_the_endpoint_and_the_fix() -> None:
    port = _free_port()
    a = args("--nnodes", "1:2", "--rdzv-id", "x", "--rdzv-endpoint", f"127.0.0.1:{port}")
    with pytest.raises(UsageError, match=f"cannot reach the rendezvous store at 127.0.0.1:{port}.*"
                                         f"ftrain rendezvous --host 127.0.0.1 --port {port}"):
        _check_multinode(a, (1, 2))
    # torchrun's own store (risky) is not checked: the first agent will host it.
    _check_multinode(args("--nnodes", "1:2", "--rdzv-id", "x", "--rdzv-endpoint", f"127.0.0.1:{port}",
                          "--rdzv-store", "agent"), (1, 2))


def test_node_rank_is_warned_about_with_elastic_nodes(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        a = args("--nnodes", "1:2", "--rdzv-id", "x", "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank", "1")
        with caplog.at_level(logging.WARNING, logger="ftrain.launch"):
            _check_multinode(a, (1, 2))
    assert "--node-rank 1 is ignored with --nnodes 1:2" in caplog.text


def test_heartbeats_carry_group_and_pid_and_old_lines_still_read(tmp_path: Path) -> None:
    files = AttemptFiles(tmp_path)
    files.create()
    writer = HeartbeatWriter(files.heartbeat(0), group=3)
    writer.beat("step", 7)
    writer.close()
    files.heartbeat(1).write_text("step 5 1000.500".ljust(79) + "\n")  # written before the fields existed
    beats = files.read_heartbeats()
    assert (beats[0].step, beats[0].group, beats[0].pid) == (7, 3, os.getpid())
    assert (beats[1].step, beats[1].time, beats[1].group, beats[1].pid) == (5, 1000.5, None, None)
