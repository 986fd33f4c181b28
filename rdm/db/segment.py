"""One immutable segment of a database: vectors, metadata, skipped items, id keys, its share of the index.

    segments/SEG/
      vectors.npy        (n, D) float32 or float16 unit vectors, memory-mapped when read
      metadata.parquet   id, path, source_row, width, height, caption, extra columns; row i <-> vector i
      skipped.parquet    id, path, reason, detail of the source items this segment's build skipped
      keys.npy           (n, 2) uint64 [xxh3_64(id), row] sorted by hash: id -> row without reading ids
      index.TAG.faiss    this segment's vectors encoded with the database's trained index TAG, labelled
                         with their global rows (approximate databases only; added when indexed)

A segment's rows are the database rows start .. start + n - 1; they never change until compaction
writes new segments. The folder is written under a temporary name and renamed into place, so it is
whole or absent.
"""

from __future__ import annotations

import bisect
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..sources.npy import VECTOR_DTYPES, _npy_header, npy_layout, read_npy_rows  # noqa: F401
from . import store

BISECT_MAX = 64  # up to this many ids are looked up by binary search in the mapped keys, more by a sorted scan


def id_hashes(ids) -> np.ndarray:
    """xxh3_64 of each id string (uint64)."""
    return np.fromiter((xxhash.xxh3_64_intdigest(i.encode()) for i in ids), np.uint64, len(ids))


READ_THREADS = 16  # concurrent reads of rows that are not in the page cache: one disk read is ~80-160 us
# here, and a virtual disk serves many at once (1000 cold rows: 76 ms in one thread, 22 ms in 16)
RUN_CAP = 64 << 20  # at most this many bytes a read
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _reader_pool() -> ThreadPoolExecutor:
    """The process's pool of reader threads (made again in a forked child: a parent's threads don't exist there)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rdm-pread"))
    return _pool[1]


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill view from the file at offset (blocking reads until full)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"file ends {len(view) - done} bytes early")
        done += got


def pread_rows(fd: int, offset: int, row_bytes: int, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i] = row rows[i] (sorted) of an open .npy (data at `offset`), one read per run of consecutive rows.

    Rows without a memory map: a mapped row leaves its whole page-cache folio (up to ~1-2 MB on recent kernels,
    whatever madvise says) mapped and counted in the process's RSS, so 1000 scattered rows of a 1M database
    grew a search process by 1.1 GB. Reads that the page cache can serve are made at once (RWF_NOWAIT,
    ~2.5 us a row); the others are read by READ_THREADS threads at a time, so a cold search waits for its
    disk reads together rather than one after another.
    """
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if not n:
        return
    view = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    lo, hi = np.r_[0, breaks], np.r_[breaks, n]
    cap = max(1, RUN_CAP // row_bytes)
    if (hi - lo).max() > cap:  # split long runs
        lo = np.concatenate([np.arange(a, b, cap) for a, b in zip(lo, hi)])
        hi = np.minimum(np.r_[lo[1:], n], lo + cap)
    firsts, lasts, ats = (lo * row_bytes).tolist(), (hi * row_bytes).tolist(), (offset + rows[lo] * row_bytes).tolist()
    preadv, nowait = os.preadv, getattr(os, "RWF_NOWAIT", 0)
    pending = []
    if nowait and len(firsts) > 1:
        for a, b, at in zip(firsts, lasts, ats):  # the hot loop of a search (1000 rows): ~2.5-3 us a row
            chunk = view[a:b]
            try:
                if preadv(fd, [chunk], at, nowait) == b - a:
                    continue
            except BlockingIOError:
                pass
            pending.append((chunk, at))  # not (all) in the page cache
    else:
        pending = [(view[a:b], at) for a, b, at in zip(firsts, lasts, ats)]
    if len(pending) <= 2:
        for chunk, at in pending:
            _read_into(fd, chunk, at)
    else:
        groups = [pending[i::READ_THREADS] for i in range(min(READ_THREADS, len(pending)))]
        list(_reader_pool().map(lambda group: [_read_into(fd, c, at) for c, at in group], groups))


def read_npy_picks(path: Path, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows of a 2-d .npy, in its dtype, by pread (pread_rows: no memory map)."""
    offset, shape, dtype = npy_layout(path)
    out = np.empty((len(rows),) + tuple(shape[1:]), dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_rows(fd, offset, int(np.prod(shape[1:])) * dtype.itemsize, rows, out)
    finally:
        os.close(fd)
    return out


def _write_npy(array: np.ndarray):
    return lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _write_parquet(table: pa.Table):
    return lambda f: pq.write_table(table, f)


def write_segment(db_dir: Path, start: int, vectors: np.ndarray, metadata: pa.Table, skipped: pa.Table,
                  dtype: str = "float32", label: str | None = None) -> dict:
    """Write a new segment folder atomically; return its manifest entry (files relative to db_dir).

    The folder is named after `start` (its first row), or after `label` when the writer does not know
    its rows yet (a parallel build's worker: the driver sets the entry's start when it orders them).
    """
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype must be one of {VECTOR_DTYPES}, got {dtype}")
    seg_id = f"{label or f's{start:012d}'}-{secrets.token_hex(4)}"
    root = db_dir / store.SEGMENTS
    tmp = root / f".tmp-{seg_id}"
    tmp.mkdir(parents=True)
    ids = metadata.column("id").to_pylist() if metadata.num_rows else []
    hashes = id_hashes(ids)
    order = np.argsort(hashes, kind="stable")
    keys = np.stack([hashes[order], order.astype(np.uint64)], 1) if len(ids) else np.zeros((0, 2), np.uint64)
    contents = {"vectors": ("vectors.npy", _write_npy(vectors.astype(dtype, copy=False))),
                "metadata": ("metadata.parquet", _write_parquet(metadata)),
                "skipped": ("skipped.parquet", _write_parquet(skipped)),
                "keys": ("keys.npy", _write_npy(keys))}
    written = {kind: (fname, store.atomic_write(tmp / fname, write)) for kind, (fname, write) in contents.items()}
    final = root / seg_id
    os.rename(tmp, final)
    store.fsync_dir(root)
    files = {kind: store.file_entry(db_dir, final / fname, w) for kind, (fname, w) in written.items()}
    return {"id": seg_id, "start": int(start), "rows": int(len(vectors)), "dtype": dtype,
            "skipped": int(skipped.num_rows), "columns": metadata.column_names, "files": files}


def write_segment_index(db_dir: Path, entry: dict, data: bytes, tag: str) -> dict:
    """Add this segment's share of the index (serialized FAISS bytes) to its folder; return the new entry."""
    path = db_dir / store.SEGMENTS / entry["id"] / f"index.{tag}.faiss"
    written = store.atomic_write(path, data)
    files = dict(entry["files"], index=store.file_entry(db_dir, path, written))
    return dict(entry, files=files, index_tag=tag)


@dataclass
class Segment:
    """A segment opened for reading: its vectors' file held open and read by pread, metadata read when first
    needed."""

    db_dir: Path
    name: str  # the database's name, for error messages
    entry: dict
    verify: bool  # check digests of files when they are read into memory
    shape: tuple = field(init=False)  # of the stored vectors, (rows, D)
    dtype: np.dtype = field(init=False)
    _metadata: pa.Table | None = field(default=None, init=False)
    _meta_file: object = field(default=None, init=False)
    _vec_file: object = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)  # searches may run in threads

    def __post_init__(self):
        files = self.entry["files"]
        for e in files.values():
            store.check_size(self.db_dir, self.name, e)  # a missing file raises FileNotFoundError: retried
        vec_path = self.db_dir / files["vectors"]["name"]
        # keep the files open: a compaction may delete them while this reader still needs them
        self._vec_file = open(vec_path, "rb", buffering=0)
        try:
            self._offset, self.shape, self.dtype = _npy_header(self._vec_file)
            self.keys = np.load(self.db_dir / files["keys"]["name"], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            self.close()
            if isinstance(e, FileNotFoundError):
                raise
            raise store.corrupt(self.name, f"{files['vectors']['name']}: {e}") from None
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if len(self.shape) != 2 or self.shape[0] != self.rows or self.keys.shape != (self.rows, 2) \
                or self._offset + self.rows * self.row_bytes > os.fstat(self._vec_file.fileno()).st_size:
            self.close()
            raise store.corrupt(self.name, f"segment {self.id} holds {self.shape} vectors, "
                                           f"its manifest entry says {self.rows}")
        self._meta_file = open(self.db_dir / files["metadata"]["name"], "rb")

    @property
    def id(self) -> str:
        return self.entry["id"]

    @property
    def start(self) -> int:
        return self.entry["start"]

    @property
    def rows(self) -> int:
        return self.entry["rows"]

    @property
    def dim(self) -> int:
        return int(self.shape[1])

    def read_rows(self, local: np.ndarray) -> np.ndarray:
        """Vectors at sorted local rows, in the stored dtype (pread_rows: nothing mapped)."""
        out = np.empty((len(local), self.dim), self.dtype)
        pread_rows(self._vec_file.fileno(), self._offset, self.row_bytes, local, out)
        return out

    def read_block(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi, in the stored dtype: one read."""
        hi = min(hi, self.rows)
        out = np.empty((max(0, hi - lo), self.dim), self.dtype)
        if len(out):
            _read_into(self._vec_file.fileno(), memoryview(out.reshape(-1).view(np.uint8)), self._offset + lo * self.row_bytes)
        return out

    def _read_table(self, f, entry: dict, columns=None) -> pa.Table:
        """A parquet file's table from its bytes (digest checked first when verifying); Arrow reads an
        in-memory buffer, never a Python file object from its own threads, and in this thread: a process
        that exits soon after a threaded parquet read can abort in Arrow's thread-pool teardown
        ("terminate called without an active exception", apache/arrow#34314; it killed a 10M
        bench's `search` process once); one thread costs ~2 ms of ~22 for a 262k-row segment."""
        f.seek(0)
        data = f.read()
        if self.verify and xxhash.xxh3_128_hexdigest(data) != entry[store.HASH]:
            raise store.corrupt(self.name, f"{entry['name']} does not match its checksum")
        try:
            return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)  # read_table imports pyarrow.dataset and pandas: 0.35 s, ~100 MB
        except pa.ArrowException as e:
            raise store.corrupt(self.name, f"{entry['name']}: {e}") from None

    @property
    def metadata(self) -> pa.Table:
        with self._lock:
            return self._load_metadata()

    def _load_metadata(self) -> pa.Table:
        if self._metadata is None:
            table = self._read_table(self._meta_file, self.entry["files"]["metadata"])
            if table.num_rows != self.rows:
                raise store.corrupt(self.name, f"segment {self.id} has {table.num_rows} metadata rows for "
                                               f"{self.rows} vectors")
            self._metadata = table
        return self._metadata

    def column_names(self) -> list[str]:
        with self._lock:
            if self._metadata is not None:
                return self._metadata.column_names
            try:
                return pq.read_schema(self.db_dir / self.entry["files"]["metadata"]["name"]).names
            except (OSError, pa.ArrowException):  # deleted by a compaction since: read the table we hold open
                return self._load_metadata().column_names

    def skipped(self) -> pa.Table:
        entry = self.entry["files"]["skipped"]
        with open(self.db_dir / entry["name"], "rb") as f:
            return self._read_table(f, entry)

    def rows_of(self, ids: list[str]) -> dict[str, int]:
        """Local rows of those ids that this segment holds (hash lookup, then confirmed on the ids)."""
        if not ids or self.rows == 0:
            return {}
        hashes = id_hashes(ids)
        keys = self.keys[:, 0]  # a strided view of the mapped file
        if len(hashes) <= BISECT_MAX:  # ~log2(n) probes an id touch a few pages, not the column (10M ids: 80 MB)
            pos = np.array([bisect.bisect_left(keys, int(h)) for h in hashes], np.int64)
        else:
            keys = np.ascontiguousarray(keys)
            pos = np.searchsorted(keys, hashes)
        hit = np.nonzero(keys[np.minimum(pos, self.rows - 1)] == hashes)[0]  # only these can be here
        found: dict[str, int] = {}
        candidates = []
        for i in hit:
            p = pos[i]
            while p < self.rows and keys[p] == hashes[i]:
                candidates.append((ids[i], int(self.keys[p, 1])))
                p += 1
        if candidates:
            id_col = self.metadata.column("id")
            for ident, row in candidates:
                if id_col[row].as_py() == ident:
                    found[ident] = row
        return found

    def close(self) -> None:
        for f in ("_meta_file", "_vec_file"):
            if getattr(self, f) is not None:
                getattr(self, f).close()
                setattr(self, f, None)
