"""Worker side: a small key-value exchange between the ranks of a job, for the threads that may not use the
training process group (the background writer, the uploader).

Why not the filesystem: with node-local checkpoint directories (docs/FORMAT.md, "Disks") a rank cannot see
another node's files, so "every shard is durable" must travel through the job itself. Why not collectives: a
background thread that joined the training process group could deadlock it. So the exchange rides on the job's
c10d store, the one ``init_process_group`` rendezvoused through (torchrun's, or ``ftrain rendezvous`` on a
multi-node launch), through a client connection of its own per thread; with one process it is a dict.

Keys live under ``ftrain/<nonce>/`` (the save nonce the ranks agree on at setup), so a restarted job never reads
an earlier attempt's keys. Values are bytes. Thread-safe.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

#: Polling a key backs off from this to :data:`_MAX_POLL` seconds.
_FIRST_POLL = 0.001
_MAX_POLL = 0.05
#: The timeout of each store operation (a store that does not answer in this long is gone).
_OP_TIMEOUT = timedelta(seconds=60)


class Exchange(Protocol):
    """What the checkpoint protocol needs from the job's store."""

    def set(self, key: str, value: bytes) -> None: ...

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if nobody set it (never blocks)."""
        ...

    def add(self, key: str, amount: int) -> int:
        """Add to the counter ``key`` (0 if unset); its new value."""
        ...

    def delete(self, key: str) -> None: ...


class LocalExchange:
    """The exchange of a one-process job (and of tests): a dict behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._values[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._values.get(key)

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            value = int(self._values.get(key, b"0")) + amount
            self._values[key] = str(value).encode()
            return value

    def delete(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)

    def __len__(self) -> int:
        return len(self._values)


class StoreExchange:
    """The exchange over a c10d store: each thread talks through a client connection of its own."""

    def __init__(self, connect: Callable[[], Any], prefix: str) -> None:
        self._connect = connect
        self._prefix = prefix
        self._local = threading.local()

    def _store(self) -> Any:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = self._connect()
        return store

    def set(self, key: str, value: bytes) -> None:
        self._store().set(self._prefix + key, value)

    def get(self, key: str) -> bytes | None:
        store, full = self._store(), self._prefix + key
        if not store.check([full]):
            return None
        return bytes(store.get(full))

    def add(self, key: str, amount: int) -> int:
        return int(self._store().add(self._prefix + key, amount))

    def delete(self, key: str) -> None:
        self._store().delete_key(self._prefix + key)


def for_job(world_size: int, nonce: str) -> Exchange:
    """The exchange of this job: over its default process group's store, or a dict for one process."""
    if world_size == 1:
        return LocalExchange()
    import torch.distributed as dist

    store: Any = dist.distributed_c10d._get_default_store()
    while getattr(store, "underlying_store", None) is not None:  # torchrun wraps its TCPStore in prefix stores
        store = store.underlying_store
    prefix = f"ftrain/{nonce}/"
    if isinstance(store, dist.TCPStore):
        host, port = store.host, store.port
        return StoreExchange(lambda: dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                                   timeout=_OP_TIMEOUT), prefix)
    # A FileStore or HashStore is thread-safe and has no connection to share: use it as it is.
    return StoreExchange(lambda: store, prefix)


def wait_for(look: Callable[[], Any], deadline: float, *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> Any:
    """Call ``look`` until it returns something other than None (returned), backing off; TimeoutError once
    ``deadline`` (a ``clock`` time) has passed."""
    delay = _FIRST_POLL
    while True:
        got = look()
        if got is not None:
            return got
        if clock() > deadline:
            raise TimeoutError
        sleep(delay)
        delay = min(delay * 2, _MAX_POLL)
