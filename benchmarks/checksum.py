"""Checksum throughput against the memcpy floor, on the same bytes, in one run.

    .venv/bin/python benchmarks/checksum.py [--mib 256] [--repeat 3]

Prints GB/s for each candidate and its ratio to a warm memcpy of the same buffer.
ftrain uses XXH3-128 (ftrain/checkpoint/checksum.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib
from typing import Callable

import xxhash


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm caches and pages
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    data = bytearray(os.urandom(args.mib << 20))
    view = memoryview(data)
    dst = bytearray(len(data))
    n = len(data)

    def memcpy() -> None:
        memoryview(dst)[:] = view

    floor = best_of(memcpy, args.repeat)
    rows = [("memcpy (floor)", floor)]
    candidates: dict[str, Callable[[], object]] = {
        "xxh3_128 (ftrain)": lambda: xxhash.xxh3_128(view).digest(),
        "xxh3_64": lambda: xxhash.xxh3_64(view).digest(),
        "zlib.crc32": lambda: zlib.crc32(view),
        "sha256": lambda: hashlib.sha256(view).digest(),
        "blake2b": lambda: hashlib.blake2b(view).digest(),
    }
    for name, fn in candidates.items():
        rows.append((name, best_of(fn, args.repeat)))
    print(f"{args.mib} MiB, best of {args.repeat}")
    print(f"{'what':<20} {'GB/s':>8} {'time / memcpy':>14}")
    for name, t in rows:
        print(f"{name:<20} {n / t / 1e9:>8.2f} {t / floor:>13.2f}x")


if __name__ == "__main__":
    main()
