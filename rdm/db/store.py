"""A database folder on disk: the manifest as the one commit point over immutable segments.

    indexes/NAME/
      manifest.json                   the commit point: what built it, the segments, the tombstones,
                                      the index settings, and the size + xxh3 digest of every file
      trained.TAG.faiss               the trained, empty FAISS index every segment's share was encoded
                                      with (approximate databases only)
      tombstones.GEN.npy              sorted int64 rows that were removed (takedowns), until compaction
      segments/SEG/                   one immutable segment (rdm.db.segment): vectors.npy (memory-mapped),
                                      metadata.parquet, skipped.parquet, keys.npy (id lookup) and its
                                      share of the index, index.TAG.faiss
      .lock                           held by the one process allowed to write
      .build/, .compact/              unfinished work, resumable (--resume, rdm compact)

A write creates new files beside the old ones (a segment folder is written under a temporary name
and renamed into place), then atomically replaces manifest.json (the commit), then deletes what no
manifest names any more. Readers read the manifest first and only the files it names, so they see
the old or the new database, never half of one (faiss contrib/ondisk.py and big_batch_search.py
work the same way: write aside, then os.replace).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from ..errors import DatabaseBusy, DatabaseCorrupt, DatabaseError
from ..util import files as _files
from ..util.files import (  # noqa: F401 (the store's writes are these)
    HashingWriter,
    _hash_file,
    atomic_folder,
    atomic_write,
    atomic_write_json,
    commit_folder,
    digest_file,
    fsync_dir,
    new_generation,
    now,
    sha256_file,
    sha256_files,
)

FORMAT = "rdm-database"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SEGMENTS = "segments"
WORK_DIRS = (".build", ".compact")  # unfinished writes; their progress files name what they keep
PROGRESS = "progress.json"
HASH = _files.HASH  # digest of every data file (xxh3-128)


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


def file_entry(db_dir: Path, path: Path, written: dict | None = None) -> dict:
    """Manifest entry of a data file: its path relative to the database, size and digest."""
    written = written or {"bytes": path.stat().st_size, HASH: digest_file(path)}
    return {"name": path.relative_to(db_dir).as_posix(), "bytes": written["bytes"], HASH: written[HASH]}


def corrupt(name: str, what: str) -> DatabaseCorrupt:
    return DatabaseCorrupt(f"database {name} is corrupt: {what}; rebuild it "
                           f"(rdm build-index SOURCE --name {name} --overwrite)")


def check_size(db_dir: Path, name: str, entry: dict) -> Path:
    """The file an entry names, if its size matches (FileNotFoundError when it is gone)."""
    path = db_dir / entry["name"]
    if path.stat().st_size != entry["bytes"]:
        raise corrupt(name, f"{entry['name']} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
    return path


def verify_file(db_dir: Path, name: str, entry: dict) -> Path:
    """Check a data file's size and digest against its manifest entry; DatabaseCorrupt when they differ."""
    path = check_size(db_dir, name, entry)
    if digest_file(path) != entry[HASH]:
        raise corrupt(name, f"{entry['name']} does not match its checksum")
    return path


def fingerprint(parts: list[str]) -> str:
    """One checksum for a database state: a digest over its files' digests."""
    h = hashlib.sha256()
    for p in parts:
        h.update(f"{p};".encode())
    return h.hexdigest()[:16]


# -- the manifest --------------------------------------------------------------------------------
def read_manifest(db_dir: Path, name: str) -> dict:
    """Parse and sanity-check manifest.json; DatabaseCorrupt if it is unreadable."""
    path = db_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise corrupt(name, f"{MANIFEST} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise corrupt(name, f"{MANIFEST} is not an rdm database manifest")
    version = manifest.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise DatabaseError(f"database {name} has format version {version}, newer than this rdm understands "
                            f"({FORMAT_VERSION}); upgrade rdm")
    if version < FORMAT_VERSION:
        raise DatabaseError(f"database {name} was written by an older rdm (format {version}, one monolithic "
                            f"generation); rebuild it: rdm build-index SOURCE --name {name} --overwrite")
    if not isinstance(manifest.get("segments"), list):
        raise corrupt(name, f"{MANIFEST} lists no segments")
    return manifest


def manifest_info(path: Path, m: dict) -> dict:
    """A database's description from its manifest alone (what `rdm info` prints; reads no data file)."""
    size = sum(e["bytes"] for s in m["segments"] for e in s["files"].values())
    size += sum(m[k]["bytes"] for k in ("trained", "tombstones") if m.get(k))
    columns: list[str] = []
    for s in m["segments"]:
        columns += [c for c in s.get("columns", []) if c not in columns]
    return {"name": m.get("name") or path.name, "path": str(path), "count": m["count"], "dim": m["dim"],
            "embedder": m["embedder"], "metric": m["metric"], "index": m["index"], "index_factory": m["index_factory"],
            "vector_dtype": m.get("vector_dtype", "float32"), "segments": len(m["segments"]),
            "removed": (m.get("tombstones") or {}).get("count", 0), "skipped_count": m.get("skipped_count", 0),
            "columns": columns, "created": m["created"], "updated": m.get("updated"),
            "sources": m.get("sources", []), "fingerprint": m["fingerprint"], "bytes_on_disk": size}


def referenced_files(manifest: dict) -> set[str]:
    """Every file a manifest names (relative paths)."""
    names = {e["name"] for seg in manifest["segments"] for e in seg["files"].values()}
    for key in ("trained", "tombstones"):
        if manifest.get(key):
            names.add(manifest[key]["name"])
    return names


def _kept_by_work(db_dir: Path) -> set[str]:
    """Files an unfinished build or compaction has written and will reuse when resumed."""
    keep: set[str] = set()
    for work in WORK_DIRS:
        progress = db_dir / work / PROGRESS
        if progress.is_file():
            try:
                keep |= set(json.loads(progress.read_text()).get("files", []))
            except (json.JSONDecodeError, OSError):
                pass
    return keep


def commit(db_dir: Path, manifest: dict, fault: Callable[[str], None] | None = None) -> None:
    """Atomically publish a manifest (the commit point), then delete files no manifest names any more."""
    atomic_write_json(db_dir / MANIFEST, manifest)
    if fault is not None:
        fault("after-commit")
    collect_garbage(db_dir, manifest)


def collect_garbage(db_dir: Path, manifest: dict | None) -> None:
    """Delete segments and top-level data files that neither the manifest nor unfinished work names."""
    keep = (referenced_files(manifest) if manifest else set()) | _kept_by_work(db_dir)
    keep_dirs = {Path(n).parts[1] for n in keep if n.startswith(SEGMENTS + "/")}
    seg_root = db_dir / SEGMENTS
    if seg_root.is_dir():
        for d in seg_root.iterdir():
            if d.name not in keep_dirs:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            elif d.is_dir():
                for f in d.iterdir():
                    if f"{SEGMENTS}/{d.name}/{f.name}" not in keep:
                        f.unlink(missing_ok=True)
    for p in db_dir.iterdir():
        if p.is_file() and p.name != MANIFEST and p.suffix in (".faiss", ".npy", ".parquet", ".tmp") \
                and p.name not in keep:
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
