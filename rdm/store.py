"""A database folder on disk: the manifest as commit point, checksummed data files, a writer lock.

    indexes/NAME/
      manifest.json                 what built it, counts, and the sha256 of every data file
      index.GEN.faiss               the FAISS index
      embeddings.GEN.npy            the exact float32 vectors (N, D), row i <-> index label i
      metadata.GEN.parquet          id, path, source_row, width, height, caption, extra columns
      skipped.GEN.parquet           id, path, reason, detail of every item that was not embedded
      .lock                         held by the one process allowed to write
      .build/                       an unfinished build (shards), resumable with --resume

A write creates files of a new generation GEN, then atomically replaces manifest.json (the commit),
then deletes files of older generations. Readers read the manifest first and only the files it names,
so they see the old or the new database, never half of one (faiss contrib/big_batch_search.py and
ondisk.py work the same way: write aside, then os.replace).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import DatabaseBusy, DatabaseCorrupt, DatabaseError

FORMAT = "rdm-database"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_FILES = ("index", "embeddings", "metadata", "skipped")
SUFFIX = {"index": "faiss", "embeddings": "npy", "metadata": "parquet", "skipped": "parquet"}


def indexes_home(home: str | os.PathLike | None = None) -> Path:
    """The databases' home: the argument, else $RDM_INDEXES, else ./indexes."""
    return Path(home or os.environ.get("RDM_INDEXES") or "indexes").expanduser()


def resolve(db: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """A database name (looked up in the home) or a database folder's path -> its folder."""
    candidate = Path(db).expanduser()
    if (candidate / MANIFEST).is_file() or os.sep in str(db) or str(db).startswith("."):
        return candidate
    return indexes_home(home) / str(db)


def list_databases(home: str | os.PathLike | None = None) -> list[str]:
    """Names of the complete databases in the home, sorted."""
    root = indexes_home(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_generation() -> str:
    """A sortable, unique generation tag for the files of one write."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    """Write bytes and flush them to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_path(db_dir: Path, kind: str, generation: str) -> Path:
    return db_dir / f"{kind}.{generation}.{SUFFIX[kind]}"


def file_entry(path: Path) -> dict:
    """Manifest entry of a written data file: its name, size and sha256."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint(files: dict) -> str:
    """One checksum for a database state: sha256 over its data files' checksums."""
    h = hashlib.sha256()
    for kind in sorted(files):
        h.update(f"{kind}:{files[kind]['sha256']};".encode())
    return h.hexdigest()[:16]


def read_manifest(db_dir: Path, name: str) -> dict:
    """Parse and sanity-check manifest.json; DatabaseCorrupt if it is unreadable."""
    path = db_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DatabaseCorrupt(f"database {name} is corrupt: {MANIFEST} is unreadable ({e}); rebuild it") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise DatabaseCorrupt(f"database {name} is corrupt: {MANIFEST} is not an rdm database manifest; rebuild it")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DatabaseError(f"database {name} has format version {manifest['format_version']}, newer than this "
                            f"rdm understands ({FORMAT_VERSION}); upgrade rdm")
    missing = [k for k in DATA_FILES if k not in manifest["files"]]
    if missing:
        raise DatabaseCorrupt(f"database {name} is corrupt: manifest lacks {', '.join(missing)}; rebuild it")
    return manifest


def verify_file(db_dir: Path, name: str, entry: dict) -> Path:
    """Check a data file's size and sha256 against the manifest; DatabaseCorrupt when they differ."""
    path = db_dir / entry["name"]
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise DatabaseCorrupt(f"database {name} is corrupt: {entry['name']} does not match its checksum; rebuild it "
                              f"(rdm build-index SOURCE --name {name} --overwrite)")
    return path


def commit(db_dir: Path, manifest: dict) -> None:
    """Atomically publish a manifest (the commit point), then delete files no longer referenced."""
    tmp = db_dir / f".{MANIFEST}.{secrets.token_hex(4)}.tmp"
    fsync_write(tmp, json.dumps(manifest, indent=2, sort_keys=True).encode())
    os.replace(tmp, db_dir / MANIFEST)
    fsync_dir(db_dir)
    keep = {e["name"] for e in manifest["files"].values()}
    for p in db_dir.iterdir():
        if p.is_file() and p.suffix in (".faiss", ".npy", ".parquet") and p.name not in keep and p.name.count(".") == 2:
            p.unlink(missing_ok=True)


_LOCKS: dict[str, FileLock] = {}


@contextmanager
def writer_lock(db_dir: Path, name: str) -> Iterator[None]:
    """Hold the database's write lock (re-entrant in one process); a second writer gets DatabaseBusy at once."""
    db_dir.mkdir(parents=True, exist_ok=True)
    key = str((db_dir / ".lock").resolve())
    lock = _LOCKS.setdefault(key, FileLock(key, timeout=0))
    owner = db_dir / ".lock.owner"
    try:
        lock.acquire()
    except Timeout:
        who = owner.read_text().strip() if owner.is_file() else "another process"
        raise DatabaseBusy(f"database {name} is being written by {who}; wait for it to finish, or build under "
                           "another --name") from None
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            owner.write_text(f"pid {os.getpid()} since {now()}")
        yield
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()
