"""The retrieval contract: what the pipeline needs from a database, and a registry that hands them out.

    registry = DatabaseRegistry("indexes")                     # owned by the caller (CLI, service)
    artbench = registry.get("artbench")                        # a Retriever, reloaded when a writer commits
    pipe("a lighthouse", databases=[(artbench, 1.0)])          # or databases="artbench", indexes=registry

A `Retriever` is anything with `name`, `identity`, `fingerprint`, `count` and a `search` whose result
(`Retrieved`) holds its own copies of the neighbours' vectors, scores and records: the result stays
valid after the database behind it is replaced by a new generation. `Database` is one source of
retrievers (`DatabaseRetriever` wraps it); tests use an in-memory one.

The registry opens each database once per process and reopens it when its manifest.json changes
(every commit `os.replace`s it, so a takedown by `rdm remove` in another process is seen by the next
search); diffusers components are passed in the same way, never looked up by the pipeline itself.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..embed.identity import EmbedderIdentity
from ..errors import DatabaseError
from . import store
from .database import Database

Where = Mapping[str, Sequence[str]] | Sequence[str] | None


@runtime_checkable
class SearchHits(Protocol):
    """k neighbours per query; rows are -1 (and scores -inf) where fewer than k items qualify."""

    scores: np.ndarray  # (Q, k) cosine similarities
    rows: np.ndarray  # (Q, k) row numbers, -1 for padding

    def embeddings(self) -> np.ndarray: ...  # (Q, k, D) the stored vectors, zeros where rows are -1

    def hits(self, q: int = 0) -> list[dict]: ...  # query q's neighbours: id, score, row, metadata columns


@runtime_checkable
class Retriever(Protocol):
    """The search contract the pipeline relies on (rdm.sampling.conditioning.retrieve calls only this)."""

    name: str
    identity: EmbedderIdentity  # the CLIP that made the vectors
    fingerprint: str  # changes whenever the content does
    count: int  # items searchable now

    def search(self, queries: np.ndarray, k: int, where: Where = None) -> SearchHits: ...


@dataclass
class Retrieved:
    """A self-contained search result: copies of the vectors and records, no reference to the database."""

    scores: np.ndarray  # (Q, k) float32
    rows: np.ndarray  # (Q, k) int64, -1 for padding
    vectors: np.ndarray  # (Q, k, D) float32, zeros where rows are -1
    records: list[list[dict]]  # per query, the valid hits in order: id, score, row, metadata columns

    def embeddings(self) -> np.ndarray:
        return self.vectors

    def hits(self, q: int = 0) -> list[dict]:
        return [dict(h) for h in self.records[q]]


class DatabaseRetriever:
    """A Retriever over one generation of a Database (the registry swaps in a new one after each commit)."""

    def __init__(self, database: Database, stamp: tuple[int, int]):
        self.database = database
        self.stamp = stamp  # (inode, mtime_ns) of the manifest this generation was read from
        self.name = database.name
        self.identity = database.identity
        self.fingerprint = database.fingerprint
        self.count = database.count
        self.dim = database.dim
        self._lock = threading.Lock()  # a Database reads its files lazily and does not promise thread safety

    @property
    def licence_rule(self):
        """The collection's licence rule as it is now (`rdm licence` changes it while the service runs)."""
        from .licence import read_rule

        return read_rule(self.database.path, self.name)

    def search(self, queries: np.ndarray, k: int, where: Where = None) -> Retrieved:
        with self._lock:
            result = self.database.search(np.asarray(queries, np.float32), k=k, where=where)
            return Retrieved(np.asarray(result.scores, np.float32), np.asarray(result.rows, np.int64),
                             np.asarray(result.embeddings(), np.float32),
                             [result.hits(q) for q in range(len(result.rows))])

    def lookup(self, item_id: str) -> tuple[dict, np.ndarray] | None:
        """(record, stored vector (D,)) of the item with this id, or None; the id is only compared, never a path."""
        with self._lock:
            row = self.database.rows_of([item_id]).get(item_id)  # hashed id keys: no scan of the metadata
            if row is None:
                return None
            return self.database.records([row])[0], self.database.vectors_at([row])[0]

    def info(self) -> dict:
        with self._lock:
            return self.database.info()

    def remove(self, ids: Sequence[str] = (), where: Sequence[str] | None = None) -> list[str]:
        """A takedown, committed as a new generation (the registry then opens it for the next search)."""
        with self._lock:
            return self.database.remove(ids=list(ids), where=where)

    def source_folders(self) -> list[Path]:
        """The folders this database's images were read from (folder sources only), resolved."""
        folders = []
        for source in self.info().get("sources", []):
            if isinstance(source, Mapping) and source.get("type") == "folder" and source.get("path"):
                folders.append(Path(os.path.realpath(source["path"])))
        return folders

    def image_file(self, record: Mapping[str, Any]) -> Path | None:
        """The record's image file if it lies inside one of the database's source folders (symlinks resolved)."""
        path = record.get("path")
        if not isinstance(path, str) or not path or "\x00" in path:
            return None
        real = Path(os.path.realpath(path))
        for folder in self.source_folders():
            if real != folder and real.is_relative_to(folder) and real.is_file():
                return real
        return None


class DatabaseRegistry:
    """Databases by public name, opened once per process and reopened when their manifest changes.

    `names` fixes which databases are served (names in the home or database folders); without it every
    complete database in the home is, including ones built after the registry was made.
    """

    def __init__(self, home: str | os.PathLike | None = None, names: Sequence[str | os.PathLike] | None = None,
                 allow_paths: bool = False, warm: bool = False):
        self.home = store.indexes_home(home)
        self.allow_paths = allow_paths  # trusted callers (notebooks, the CLI) may name database folders too
        self.warm = warm  # read each opened database's hot files into the page cache (a long-running service)
        self._warmed: set = set()  # files warmed before: a new generation shares most of them
        self.warming: dict[str, object] = {}  # public name -> rdm.db.warm.Warming of its latest generation
        self._fixed = None
        if names is not None:
            self._fixed = {}
            for spec in names:
                folder = store.resolve(spec, self.home)
                self._fixed[folder.name] = folder
        self._open: dict[str, DatabaseRetriever] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Public names of the databases served now, sorted."""
        if self._fixed is not None:
            return sorted(n for n, f in self._fixed.items() if (f / store.MANIFEST).is_file())
        return store.list_databases(self.home)

    def folder(self, name: str) -> Path:
        """The folder of a served database; DatabaseError naming the served ones otherwise."""
        if self._fixed is not None:
            folder = self._fixed.get(name)
        else:
            folder = self.home / name if name in self.names() else None  # never a path built from a request
        if folder is None:
            served = self.names()
            raise DatabaseError(f"no database '{name}'; served: {', '.join(served) if served else 'none'}")
        return folder

    def get(self, name: str) -> DatabaseRetriever:
        """The current generation of a served database (reopened after a commit by any process)."""
        folder = store.resolve(name, self.home) if self.allow_paths else self.folder(name)
        try:
            st = (folder / store.MANIFEST).stat()
            stamp = (st.st_ino, st.st_mtime_ns)  # every commit os.replace()s manifest.json
        except OSError:
            if self.allow_paths:
                Database.open(name, self.home)  # raises the store's clear error (missing, unfinished build ...)
            raise DatabaseError(f"database {name} is no longer available (its manifest is gone)") from None
        key = str(folder.resolve())
        with self._lock:
            current = self._open.get(key)
            if current is None or current.stamp != stamp:
                current = DatabaseRetriever(Database.open(str(folder)), stamp)
                self._open[key] = current
                if self.warm:
                    self.warming[name] = current.database.warm(skip=self._warmed)
            return current


_DEFAULT: dict[str, DatabaseRegistry] = {}
_DEFAULT_LOCK = threading.Lock()


def default_registry(home: str | os.PathLike | None = None) -> DatabaseRegistry:
    """One registry per databases home for callers that pass names (notebooks, `rdm sample`)."""
    key = str(store.indexes_home(home).resolve())
    with _DEFAULT_LOCK:
        return _DEFAULT.setdefault(key, DatabaseRegistry(key, allow_paths=True))


def registry_for(indexes: "DatabaseRegistry | str | os.PathLike | None") -> DatabaseRegistry:
    """The registry given, or the default one of a databases home."""
    return indexes if isinstance(indexes, DatabaseRegistry) else default_registry(indexes)


__all__ = ["Retriever", "SearchHits", "Retrieved", "DatabaseRetriever", "DatabaseRegistry", "default_registry",
           "registry_for"]
