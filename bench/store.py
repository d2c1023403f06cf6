"""What an upload costs in each store backend: put, lookup and read latency, and puts/s from several threads.

    python -m bench.store [--database-url URL] [--blob-url URL] [--size 230000] [--n 100] [--threads 4]

The URLs are those of UNETSEG_DATABASE_URL and UNETSEG_BLOB_URL (empty: SQLite and files in a temporary
folder). The store's tables and blobs must be new: the benchmark writes random bytes and deletes them after.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.config import Settings
from app.store import UploadStore, open_store


def ms(values: list[float]) -> str:
    qs = statistics.quantiles(values, n=10)
    return f"median {statistics.median(values) * 1000:.1f} ms, p90 {qs[-1] * 1000:.1f} ms"


def timed(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def run(store: UploadStore, size: int, n: int, threads: int) -> None:
    blobs = [os.urandom(size) for _ in range(n)]
    puts = [timed(store.put, b, 1, 1, "png") for b in blobs]
    ids = [store.digest(b) for b in blobs]
    gets = [timed(store.get, uid) for uid in ids]
    reads = [timed(store.read, uid) for uid in ids]
    for uid in ids:
        store.delete(uid)
    print(f"put  ({size} B): {ms(puts)}")
    print(f"get:            {ms(gets)}")
    print(f"read:           {ms(reads)}")
    more = [os.urandom(size) for _ in range(n)]
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: store.put(b, 1, 1, "png"), more))
    elapsed = time.perf_counter() - t
    print(f"{n} puts from {threads} threads: {n / elapsed:.0f} puts/s")
    for b in more:
        store.delete(store.digest(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default="")
    p.add_argument("--blob-url", default="")
    p.add_argument("--size", type=int, default=230_000, help="bytes per upload (default: a 320x240 PNG's)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=args.database_url, blob_url=args.blob_url)
        store = open_store(settings)
        try:
            print(f"metadata: {type(store.meta).__name__}, blobs: {type(store.blobs).__name__}")
            run(store, args.size, args.n, args.threads)
        finally:
            store.close()


if __name__ == "__main__":
    main()
