"""Durable file writes (write aside, fsync, rename) and digests, for every layer that writes files.

rdm.db.store builds the database's commit on these; models, adapters, training and outputs use them directly.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import xxhash

HASH = "xxh3_128"  # digest of every data file (xxhash: ~10 GB/s, so verifying is disk-bound, not CPU-bound)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_generation() -> str:
    """A sortable, unique tag for the files of one write."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


# -- digests and atomic writes ---------------------------------------------------------------------
class HashingWriter:
    """A binary file object that digests what is written through it (np.save, pq.write_table)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, xxhash.xxh3_128(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.h.update(view)
        self.n += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.n

    @property
    def closed(self) -> bool:
        return self.f.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _hash_file(path: Path, h, chunk: int = 1 << 24, prefix: bytes = b""):
    h.update(prefix)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def digest_file(path: Path) -> str:
    """xxh3-128 hex digest of a file (what manifests record)."""
    return _hash_file(path, xxhash.xxh3_128()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 hex digest (for published artifacts, whose digests are sha256)."""
    return _hash_file(path, hashlib.sha256()).hexdigest()


def sha256_files(root: Path, files: list[Path]) -> str:
    """One sha256 over files in the order given, each preceded by its path relative to root."""
    h = hashlib.sha256()
    for f in files:
        _hash_file(f, h, prefix=f.relative_to(root).as_posix().encode() + b"\n")
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable | str) -> dict:
    """Write a file so that readers see the old one or the whole new one, durably; return its entry.

    `data` is bytes, text, or a function that writes to a binary file object. The file is written
    beside its destination under a temporary name, fsynced, os.replace()d into place, and the folder
    fsynced. Returns {"bytes", "xxh3"} of what was written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            if callable(data):
                data(w)
            else:
                w.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return {"bytes": w.n, HASH: w.h.hexdigest()}


def atomic_write_json(path: str | os.PathLike, obj) -> dict:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))


@contextmanager
def atomic_folder(final: str | os.PathLike, exists: str = "replace") -> Iterator[Path]:
    """Fill a folder under a temporary name beside `final`, then rename it into place, durably.

    Yields the temporary folder; when the block ends without an exception its files are fsynced and
    it becomes `final`. An existing `final` is swapped out (exists="replace": readers see the old or
    the new folder, never a mix) or kept (exists="keep": another writer finished first, theirs wins).
    On an exception nothing changes and the temporary folder is removed.
    """
    if exists not in ("replace", "keep"):
        raise ValueError(f"exists must be 'replace' or 'keep', got {exists!r}")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = final.parent / f".{final.name}.{tag}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        commit_folder(tmp, final, exists)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def commit_folder(tmp: str | os.PathLike, final: str | os.PathLike, exists: str = "replace") -> None:
    """Make a finished temporary folder `final`: fsync its files, then rename it into place (see atomic_folder).

    For folders that another library fills under a name of its own (accelerate's save_state)."""
    tmp, final = Path(tmp), Path(final)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(tmp)
    if final.exists():
        if exists == "keep":
            shutil.rmtree(tmp)
            return
        old = final.parent / f".{final.name}.{secrets.token_hex(4)}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def human_size(n: float) -> str:
    """1536 -> '1.5 KB': a size for people."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


__all__ = ["HASH", "human_size", "HashingWriter", "atomic_folder", "atomic_write", "atomic_write_json", "commit_folder", "digest_file", "fsync_dir", "new_generation", "now", "sha256_file", "sha256_files"]
