"""The key-value exchange of the background threads (session/exchange.py), over a real c10d TCPStore."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from ftrain.session.exchange import Exchange, LocalExchange, StoreExchange, wait_for
from ftrain.session.layout import Layout


def tcp_exchange() -> tuple[Exchange, dist.TCPStore]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    port = server.port
    x = StoreExchange(lambda: dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                            timeout=timedelta(seconds=30)), "ftrain/n0nce/")
    return x, server


@pytest.mark.parametrize("kind", ["local", "tcp"])
def test_set_get_add_delete_from_many_threads(kind: str) -> None:
    x, server = (LocalExchange(), None) if kind == "local" else tcp_exchange()
    assert x.get("missing") is None
    x.set("k", b"\x00bytes\xff")
    assert x.get("k") == b"\x00bytes\xff"
    x.delete("k")
    assert x.get("k") is None

    def count() -> None:
        for _ in range(50):
            x.add("n", 1)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert x.add("n", 0) == 200
    if server is not None:  # every key under the job's prefix: a restarted job never sees an earlier one's
        assert server.check(["ftrain/n0nce/n"]) and not server.check(["n"])


def test_wait_for_backs_off_and_times_out() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    assert wait_for(lambda: "yes" if now[0] > 0.01 else None, 1.0, sleep=sleep, clock=lambda: now[0]) == "yes"
    assert slept[:3] == [0.001, 0.002, 0.004]
    with pytest.raises(TimeoutError):
        wait_for(lambda: None, 0.5, sleep=sleep, clock=lambda: now[0])
    assert max(slept) == 0.05


def test_layout_groups_ranks_by_disk_and_names_leaders() -> None:
    a, b = "a" * 32, "b" * 32
    shared = Layout(1, (a, a, a))
    assert shared.shared and shared.order == (a,) and shared.leaders == (0,) and not shared.is_leader
    local = Layout(3, (a, b, a, b))  # ranks need not be contiguous per disk
    assert not local.shared and local.order == (a, b) and local.leaders == (0, 1)
    assert local.my_disk == b and local.ranks_on(b) == (1, 3) and not local.is_leader
    assert Layout(1, (a, b, a, b)).is_leader
    assert local.describe(b) == "disk bbbbbbbb (ranks 1,3)" and local.describe("c" * 32) == "disk cccccccc"
