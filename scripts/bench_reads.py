"""How a search should read its candidates' stored vectors: memory map against pread, warm and cold.

    python scripts/bench_reads.py PATH/vectors.npy [--rows 1000] [--repeats 20]

Reads `--rows` random sorted rows of a 2-d .npy (a segment's vectors, or bench_scale's input) per
repeat, as one search's re-scoring does, and prints per design the median and p90 time and how much
the process's file-backed resident memory (RssFile) grew. "cold" evicts the file from the page cache
before each repeat (posix_fadvise DONTNEED: no root needed), "warm" reads it into the cache first.
rdm's reader is `rdm.db.segment.pread_rows`: RWF_NOWAIT reads for cached rows, then READ_THREADS threads
for the others.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rdm import segment  # noqa: E402


def rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    offset, shape, dtype = segment.npy_layout(a.path)
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    fd = os.open(a.path, os.O_RDONLY)
    rng = np.random.default_rng(0)

    maps = np.load(a.path, mmap_mode="r")  # one map for the whole run, as a reader holding a segment open had
    maps._mmap.madvise(mmap.MADV_RANDOM)
    maps = maps.view(np.ndarray)

    def mapped(rows):
        return maps[rows]

    def pread_one_thread(rows):
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for i, r in enumerate(rows.tolist()):
            segment._read_into(fd, view[i * row_bytes:(i + 1) * row_bytes], offset + r * row_bytes)
        return out

    def rdm_reader(rows):
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype)
        segment.pread_rows(fd, offset, row_bytes, rows, out)
        return out

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.path} {shape} {dtype}; "
          f"{a.rows} random rows x {a.repeats}")
    print("| read | cache | median ms | p90 ms | RssFile grew MB |\n|---|---|---|---|---|")
    for cache in ("warm", "cold"):
        if cache == "warm":
            with open(a.path, "rb") as f:
                while f.read(64 << 20):
                    pass
        for name, read in (("memory map (MADV_RANDOM)", mapped), ("pread, one thread", pread_one_thread),
                           (f"rdm pread_rows ({segment.READ_THREADS} threads)", rdm_reader)):
            times, before, grew = [], rss_file_kb(), 0
            for _ in range(a.repeats):
                rows = np.sort(rng.choice(shape[0], a.rows, replace=False))
                if cache == "cold":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                got = read(rows)
                times.append(time.perf_counter() - t)
                grew = max(grew, rss_file_kb() - before)
            assert np.array_equal(got, np.load(a.path, mmap_mode="r")[rows])
            print(f"| {name} | {cache} | {np.median(times) * 1e3:.2f} | {np.percentile(times, 90) * 1e3:.2f} | "
                  f"{grew / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
