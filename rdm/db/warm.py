"""Warm the page cache with a database's hot files, read start to end in a background thread.

A search scans its lists' codes (the index shares, memory-mapped) and re-scores its candidates from
the stored vectors (scattered `pread`s). Where those are not in the page cache, every code page and
candidate row is a random read from disk: on a disk that serves ~4k random reads a second, a 10M
database's 300 candidates take 40-80 ms, while the same rows from memory take ~1 ms. Read
sequentially, the same files come in at the disk's bandwidth (measured: 16.4 GB in 67 s, partly
cached already).
A long-running service (`rdm serve`) warms its databases when it opens them; one-shot commands do not.

Only what fits is read: the files in order (the shares first: every search scans them) until their
total would pass `MEMORY_SHARE` of the memory available now, so a database larger than memory does not
evict its own shares. Pages read stay in the page cache, not in this process's RSS.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_SHARE = 0.8  # at most this share of MemAvailable is read into the page cache
CHUNK = 16 << 20  # bytes per read


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Warming:
    """Progress of one warm-up; `wait()` for it to end."""

    files: list[Path]  # the files to read, in order
    total: int  # their bytes
    budget: int | None  # bytes that may be read (None: no limit known)
    read: int = 0  # bytes read so far
    done: list[Path] = field(default_factory=list)  # files read completely
    left_out: list[Path] = field(default_factory=list)  # files that did not fit in the budget
    errors: list[str] = field(default_factory=list)  # files that could not be read (and why)
    seconds: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def complete(self) -> bool:
        return self.finished.is_set() and not self.left_out and not self.errors

    def summary(self) -> str:
        gb = 1e9
        text = f"{self.read / gb:.2f} of {self.total / gb:.2f} GB in {self.seconds:.1f} s"
        if self.left_out:
            text += f"; {len(self.left_out)} file(s) left out: they do not fit in {MEMORY_SHARE:.0%} of available memory"
        if self.errors:
            text += f"; unreadable: {'; '.join(self.errors[:3])}"
        return text


def warm(files: list[Path], budget: int | None = None, background: bool = True) -> Warming:
    """Read `files` start to end into the page cache (in a daemon thread unless background=False)."""
    files = [Path(f) for f in files]
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError:
            sizes.append(0)
    if budget is None:
        free = available_memory()
        budget = None if free is None else int(free * MEMORY_SHARE)
    w = Warming(files=files, total=sum(sizes), budget=budget)
    if background:
        threading.Thread(target=_read_all, args=(w, sizes), name="rdm-warm", daemon=True).start()
    else:
        _read_all(w, sizes)
    return w


def _read_all(w: Warming, sizes: list[int]) -> None:
    t = time.perf_counter()
    buf = bytearray(CHUNK)
    planned = 0
    try:
        for f, size in zip(w.files, sizes):
            if w.budget is not None and planned + size > w.budget:
                w.left_out.append(f)
                continue
            planned += size
            try:
                _read_file(f, buf, w)
                w.done.append(f)
            except OSError as e:
                w.errors.append(f"{f.name}: {e.strerror or e}")
    finally:
        w.seconds = time.perf_counter() - t
        w.finished.set()


def _read_file(path: Path, buf: bytearray, w: Warming) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
        offset = 0
        while True:
            n = os.preadv(fd, [buf], offset)  # the GIL is released while the disk reads
            if n <= 0:
                break
            offset += n
            w.read += n
    finally:
        os.close(fd)
