"""A named image database: FAISS index + exact embeddings + metadata, searched by CLIP vectors.

`Database.open(name)` loads and verifies one; `search` returns the k nearest items of each query with
their exact stored vectors (conditioning needs them) and metadata; `add` and `remove` write a new
generation atomically (see rdm.store). Anything with the same `search` contract (`Retriever`) can
stand in for a Database, as schedulers do in diffusers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import index as faiss_index
from . import store
from .embedder import EmbedderIdentity
from .errors import DatabaseCorrupt, DatabaseError, RDMError

FILTER_EXACT_MAX = 20_000  # filters matching at most this many rows: exact search over a copy of the subset;
# more: the index itself searches with a FAISS IDSelector (exact for Flat, no copy of the vectors)
BASE_COLUMNS = {"id": pa.string(), "path": pa.string(), "source_row": pa.int64(), "width": pa.int64(),
                "height": pa.int64(), "caption": pa.string()}
SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string())])


@dataclass
class SearchResult:
    """k neighbours per query; rows are -1 (and scores -inf) where fewer than k items qualify."""

    scores: np.ndarray  # (Q, k) float32 inner products (cosine similarities)
    rows: np.ndarray  # (Q, k) int64 row numbers in the database, -1 for padding
    database: "Database"

    def embeddings(self) -> np.ndarray:
        """(Q, k, D) exact stored vectors of the neighbours; zeros where rows are -1."""
        return self.database.vectors_at(self.rows)

    def hits(self, q: int = 0) -> list[dict]:
        """Neighbours of query q as dicts: id, score, row, then the metadata columns."""
        valid = [(int(r), float(s)) for r, s in zip(self.rows[q], self.scores[q]) if r >= 0]
        records = self.database.records([r for r, _ in valid])
        return [{"id": rec.pop("id"), "score": s, "row": r, **rec} for (r, s), rec in zip(valid, records)]


class Retriever(Protocol):
    """The search contract the pipeline relies on."""

    name: str
    identity: EmbedderIdentity
    fingerprint: str

    def search(self, queries: np.ndarray, k: int, where: Mapping[str, Sequence[str]] | None = None
               ) -> SearchResult: ...


# ---------------------------------------------------------------------------------------------
def parse_where(clauses: Sequence[str] | Mapping[str, Any] | None) -> dict[str, list[str]]:
    """["style=neon", "style=flat", "licence=cc0"] -> {"style": ["neon", "flat"], "licence": ["cc0"]}."""
    if not clauses:
        return {}
    if isinstance(clauses, Mapping):
        return {k: [str(x) for x in (v if isinstance(v, (list, tuple, set)) else [v])] for k, v in clauses.items()}
    out: dict[str, list[str]] = {}
    for clause in clauses:
        col, sep, value = clause.partition("=")
        if not sep or not col.strip():
            raise RDMError(f"filter '{clause}' is not COLUMN=VALUE")
        out.setdefault(col.strip(), []).append(value.strip())
    return out


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Metadata rows -> Arrow table: base columns typed, extra columns inferred (strings on conflict)."""
    columns: dict[str, list] = {c: [] for c in BASE_COLUMNS}
    for r in rows:
        for c in r:
            columns.setdefault(c, [])
    arrays, names = [], []
    for col in columns:
        values = [r.get(col) for r in rows]
        if col in BASE_COLUMNS:
            arrays.append(pa.array(values, type=BASE_COLUMNS[col]))
        else:
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays.append(pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v))
                                        for v in values], type=pa.string()))
        names.append(col)
    return pa.Table.from_arrays(arrays, names=names)


def skipped_table(entries: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: e.get(k) for k in SKIPPED_SCHEMA.names} for e in entries], schema=SKIPPED_SCHEMA)


def _write_table(table: pa.Table, path: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.fsync_write(path, buf.getvalue())


def _write_npy(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    store.fsync_write(path, buf.getvalue())


def write_generation(db_dir: Path, name: str, vectors: np.ndarray, metadata: pa.Table, skipped: pa.Table,
                     index, spec: faiss_index.IndexSpec, identity: EmbedderIdentity, sources: list[dict],
                     created: str | None = None, fault: Any = None) -> dict:
    """Write all files of a new generation, then commit its manifest. Caller holds the writer lock."""
    gen = store.new_generation()
    paths = {kind: store.data_path(db_dir, kind, gen) for kind in store.DATA_FILES}
    store.fsync_write(paths["index"], faiss_index.serialize(index))
    _write_npy(vectors, paths["embeddings"])
    _write_table(metadata, paths["metadata"])
    _write_table(skipped, paths["skipped"])
    files = {kind: store.file_entry(p) for kind, p in paths.items()}
    manifest = {
        "format": store.FORMAT, "format_version": store.FORMAT_VERSION, "name": name,
        "created": created or store.now(), "updated": store.now(), "generation": gen,
        "embedder": identity.to_dict(), "dim": identity.dim, "metric": spec.metric, "count": int(len(vectors)),
        "index_factory": spec.factory, "index": spec.to_dict(), "skipped_count": skipped.num_rows,
        "sources": sources, "files": files, "fingerprint": store.fingerprint(files),
    }
    if fault is not None:
        fault("before-commit")
    store.commit(db_dir, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
class Database:
    """A loaded, verified database."""

    def __init__(self, path: Path, manifest: dict, vectors: np.ndarray, metadata: pa.Table, skipped: pa.Table, index):
        self.path = path
        self.manifest = manifest
        self.name = manifest.get("name") or path.name
        self.vectors = vectors
        self.metadata = metadata
        self.skipped = skipped
        self.index = index
        self.spec = faiss_index.IndexSpec.from_dict(manifest["index"])
        self.identity = EmbedderIdentity.from_dict(manifest["embedder"])
        self._ids = metadata.column("id").to_pylist()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def open(cls, db: str | Path, home: str | Path | None = None, verify: bool = True) -> "Database":
        """Load a database by name or folder; verify checksums; clear errors when missing or corrupt."""
        path = store.resolve(db, home)
        name = path.name
        for _attempt in range(3):  # a writer may replace the generation between manifest and files
            try:
                manifest = store.read_manifest(path, name)
                return cls._load_files(path, name, manifest, verify)
            except FileNotFoundError:
                if not (path / store.MANIFEST).is_file():
                    break
        if (path / ".build").is_dir():
            raise DatabaseError(f"database {name} has an unfinished build and no finished version; run "
                                f"`rdm build-index SOURCE --name {name} --resume` to finish it")
        if (path / store.MANIFEST).is_file():
            raise DatabaseCorrupt(f"database {name} is corrupt: a data file named in its manifest is missing; rebuild it")
        existing = store.list_databases(home)
        raise DatabaseError(f"no database '{db}' in {store.indexes_home(home)}; existing: "
                            f"{', '.join(existing) if existing else 'none (create one with rdm build-index)'}")

    @classmethod
    def _load_files(cls, path: Path, name: str, manifest: dict, verify: bool) -> "Database":
        files = manifest["files"]
        get = (lambda k: store.verify_file(path, name, files[k])) if verify else (lambda k: path / files[k]["name"])
        try:
            index = faiss_index.deserialize(get("index").read_bytes())
            vectors = np.load(get("embeddings"), allow_pickle=False)
            metadata = pq.read_table(get("metadata"))
            skipped = pq.read_table(get("skipped"))
        except (DatabaseCorrupt, FileNotFoundError):
            raise
        except (ValueError, OSError, RuntimeError, pa.ArrowException) as e:
            raise DatabaseCorrupt(f"database {name} is corrupt: {e}; rebuild it") from None
        count, dim = manifest.get("count"), manifest.get("dim")
        if not (vectors.ndim == 2 and len(vectors) == count == metadata.num_rows == index.ntotal
                and vectors.shape[1] == dim == index.d):
            raise DatabaseCorrupt(f"database {name} is corrupt: its files disagree on count/dim; rebuild it")
        return cls(path, manifest, np.ascontiguousarray(vectors, dtype=np.float32), metadata, skipped, index)

    # -- properties ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def skipped_list(self) -> list[dict]:
        return self.skipped.to_pylist()

    def records(self, rows: Sequence[int]) -> list[dict]:
        """Metadata rows as dicts (id first)."""
        if len(rows) == 0:
            return []
        return self.metadata.take(pa.array(np.asarray(rows, np.int64))).to_pylist()

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors at `rows` (any shape); zero vectors where rows are -1."""
        rows = np.asarray(rows, np.int64)
        out = self.vectors[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out

    # -- search -------------------------------------------------------------------------------
    def filter_rows(self, where: Mapping[str, Sequence[str]] | Sequence[str] | None) -> np.ndarray | None:
        """Rows matching all columns' filters (any of a column's values); None when unfiltered."""
        where = parse_where(where)
        if not where:
            return None
        mask = None
        for col, values in where.items():
            if col not in self.metadata.column_names:
                raise RDMError(f"database {self.name} has no column '{col}'; columns: "
                               f"{', '.join(self.metadata.column_names)}")
            column = self.metadata.column(col)
            as_text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string(), safe=False)
            hit = pc.fill_null(pc.is_in(as_text, value_set=pa.array(values, pa.string())), False)
            mask = hit if mask is None else pc.and_(mask, hit)
        return np.nonzero(mask.to_numpy(zero_copy_only=False))[0].astype(np.int64)

    def search(self, queries: np.ndarray, k: int = 10, where=None) -> SearchResult:
        """k nearest items of each query (Q, D); filters apply inside the search, not after it."""
        if k < 1:
            raise RDMError(f"k must be at least 1, got {k}")
        queries = faiss_index.normalise(faiss_index.check_vectors(queries, self.dim, "query embeddings"))
        allowed = self.filter_rows(where)
        if allowed is not None and len(allowed) <= FILTER_EXACT_MAX:
            scores, pos = faiss_index.exact_topk(queries, self.vectors[allowed], k)
            rows = np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1) if len(allowed) else pos
        else:
            scores, rows = faiss_index.search_index(self.index, self.spec, self.vectors, queries, k, allowed)
        return SearchResult(scores=scores, rows=rows, database=self)

    # -- writing ------------------------------------------------------------------------------
    def _rewrite(self, vectors: np.ndarray, metadata: pa.Table, skipped: pa.Table, sources: list[dict]) -> None:
        """Write the given contents as a new generation, keeping the trained index (no retraining)."""
        index = faiss_index.deserialize(faiss_index.serialize(self.index))
        faiss_index.reset_and_fill(index, vectors)
        manifest = write_generation(self.path, self.name, vectors, metadata, skipped, index, self.spec,
                                    self.identity, sources, created=self.manifest.get("created"))
        self.__init__(self.path, manifest, vectors, metadata, skipped, index)

    def add(self, vectors: np.ndarray, rows: Sequence[Mapping[str, Any]], source: dict | None = None,
            skipped: Sequence[Mapping[str, Any]] = ()) -> int:
        """Append items (ids already present are ignored); return how many were added."""
        vectors = faiss_index.normalise(faiss_index.check_vectors(vectors, self.dim, "new embeddings"))
        if len(rows) != len(vectors):
            raise RDMError(f"{len(vectors)} vectors but {len(rows)} metadata rows")
        present = set(self._ids)
        keep = [i for i, r in enumerate(rows) if r["id"] not in present and not present.add(r["id"])]
        new_meta = rows_to_table([rows[i] for i in keep])
        metadata = pa.concat_tables([self.metadata, new_meta], promote_options="permissive")
        all_skipped = pa.concat_tables([self.skipped, skipped_table(skipped)])
        sources = self.manifest.get("sources", []) + ([dict(source, added=store.now())] if source else [])
        with store.writer_lock(self.path, self.name):
            self._rewrite(np.concatenate([self.vectors, vectors[keep]]), metadata, all_skipped, sources)
        return len(keep)

    def remove(self, ids: Sequence[str] = (), where=None) -> list[str]:
        """Remove items by id and/or metadata filter (takedowns) without re-embedding; return removed ids."""
        if not ids and not where:
            raise RDMError("nothing to remove: give ids or a --where filter")
        unknown = sorted(set(ids) - set(self._ids))
        if unknown:
            raise RDMError(f"database {self.name} has no item(s) {', '.join(unknown[:10])}"
                           f"{' ...' if len(unknown) > 10 else ''}; nothing was removed")
        drop = np.zeros(self.count, bool)
        if ids:
            wanted = set(ids)
            drop |= np.fromiter((i in wanted for i in self._ids), bool, self.count)
        if where:
            drop[self.filter_rows(where)] = True
        removed = [self._ids[i] for i in np.nonzero(drop)[0]]
        if removed:
            keep = np.nonzero(~drop)[0]
            with store.writer_lock(self.path, self.name):
                self._rewrite(self.vectors[keep], self.metadata.take(pa.array(keep)), self.skipped,
                              self.manifest.get("sources", []))
        return removed

    def info(self) -> dict:
        """What `rdm info --json` prints."""
        m = self.manifest
        size = sum(e["bytes"] for e in m["files"].values())
        return {"name": self.name, "path": str(self.path), "count": self.count, "dim": self.dim,
                "embedder": m["embedder"], "metric": m["metric"], "index": m["index"],
                "index_factory": m["index_factory"], "created": m["created"], "updated": m.get("updated"),
                "sources": m.get("sources", []), "fingerprint": self.fingerprint, "bytes_on_disk": size,
                "columns": self.metadata.column_names, "skipped": self.skipped_list()}
