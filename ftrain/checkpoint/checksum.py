"""File checksums: XXH3-128.

Why XXH3: it runs at memory speed (about 11 GB/s on this machine kind, against
1.2 GB/s for SHA-256 and 2.9 GB/s for zlib's CRC32; see docs/PERFORMANCE.md), so
checksumming every byte of every checkpoint costs a small fraction of writing it.
It detects corruption (truncation, bit rot, torn writes); it is not a defence
against an adversary who can rewrite both data and manifest.
"""
from __future__ import annotations

import io
import os

import xxhash

ALGORITHM = "xxh3_128"
#: What the hashers accept: any contiguous bytes-like object.
Bytes = bytes | bytearray | memoryview
_CHUNK = 16 << 20


class Hasher:
    """Streaming checksum; feed it the bytes in file order."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: Bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest(data: Bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def stream_digest(f: io.RawIOBase) -> tuple[int, str]:
    """(size, checksum) of what is left to read in ``f``, read in chunks."""
    h = Hasher()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            break
        h.update(view[:n])
        size += n
    return size, h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, checksum) of a file, read in chunks."""
    with open(path, "rb", buffering=0) as f:
        return stream_digest(f)  # buffering=0: a FileIO, i.e. a RawIOBase
