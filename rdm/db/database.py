"""A named image database: immutable segments + tombstones under one manifest, searched by CLIP vectors.

`Database.open(name)` reads the manifest and memory-maps the segments (rdm.db.segment); it does not
read or hash gigabytes. `search` returns the k nearest live items of each query, self-contained:
scores, rows, the exact stored vectors (conditioning needs them) and the metadata records.
Writes cost what they change: `add` writes one new segment, `remove` a new tombstone set,
`compact` merges segments and drops removed rows; each ends in one atomic manifest commit
(rdm.db.store), so a reader sees the old or the new database and a killed write loses nothing.

Verification: every file's size is checked at open. Databases up to `VERIFY_ON_OPEN` bytes have
every file's digest checked at open too; larger ones have each metadata/skipped file checked when it
is first read, the trained index when it is loaded, and everything by `verify()` (`rdm verify`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..embed.identity import EmbedderIdentity
from ..errors import DatabaseError, NotFound, RDMError
from . import faiss_index, store
from .licence import read_rule
from .manifest import BASE_COLUMNS, fault, finish_manifest, rows_to_table, skipped_table
from .segment import Segment, write_segment, write_segment_index

FILTER_EXACT_MAX = 20_000  # filters matching at most this many rows: exact search over those rows;
# more: the index itself searches with a FAISS IDSelector
VERIFY_ON_OPEN = 256 << 20  # databases up to this size have every digest checked when opened
EXACT_CHUNK = 65_536  # rows per block of exact search
RERANK_BYTES = 64 << 20  # candidates' vectors re-scored at once (a batch of 512 queries x 1000 candidates is 1.5 GB)


@dataclass
class SearchResult:
    """k neighbours per query, self-contained; rows are -1 (scores -inf, vectors 0) where fewer qualify."""

    scores: np.ndarray  # (Q, k) float32 inner products (cosine similarities), exact
    rows: np.ndarray  # (Q, k) int64 rows of the database, -1 for padding
    vectors: np.ndarray  # (Q, k, D) float32 stored vectors of the neighbours
    records: list = field(default_factory=list)  # per query, the metadata dicts of its valid neighbours
    database: str = ""  # the database's name

    def embeddings(self) -> np.ndarray:
        """(Q, k, D) exact stored vectors of the neighbours; zeros where rows are -1."""
        return self.vectors

    def hits(self, q: int = 0) -> list[dict]:
        """Neighbours of query q as dicts: id, score, row, then the metadata columns."""
        valid = [(int(r), float(s)) for r, s in zip(self.rows[q], self.scores[q]) if r >= 0]
        return [{"id": rec["id"], "score": s, "row": r, **{k: v for k, v in rec.items() if k != "id"}}
                for (r, s), rec in zip(valid, self.records[q])]


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


# ---------------------------------------------------------------------------------------------
HISTORY_IDS = 1000  # removed ids recorded per history entry (the count is always recorded)
HISTORY_KEEP = 100  # history entries kept in the manifest


class Database:
    """An opened database: segments memory-mapped, tombstones loaded, the index stacked on first search."""

    def __init__(self, path: Path, manifest: dict, verify: bool | None = None):
        self.path = path
        # its folder is its name (a copied folder is another database): the manifest keeps the name it was built as
        self.name = path.name
        self.built_as = manifest.get("name") or path.name
        self.manifest = manifest
        self.spec = faiss_index.IndexSpec.from_dict(manifest["index"])
        self.identity = EmbedderIdentity.from_dict(manifest["embedder"])
        total = sum(e["bytes"] for e in self._entries())
        self._verify_reads = verify is not False and (verify is True or total > VERIFY_ON_OPEN)
        if verify is True or (verify is None and total <= VERIFY_ON_OPEN):
            for e in self._entries():
                store.verify_file(path, self.name, e)
        self.segments = [Segment(path, self.name, s, self._verify_reads) for s in manifest["segments"]]
        self.starts = np.array([s.start for s in self.segments], np.int64)
        self.tombstones = self._load_tombstones()
        self.licence_rule = read_rule(path, self.name)  # which items may condition generation (rdm.db.licence)
        self._stacked = None
        self._trained = None
        self._selector = None
        self._lock = threading.Lock()  # the stacked index is made once, whichever thread searches first
        if self.dim != manifest.get("dim") or any(s.dim != self.dim for s in self.segments):
            raise store.corrupt(self.name, "its files disagree on the vectors' dimension")

    def _entries(self) -> list[dict]:
        m = self.manifest
        return [e for s in m["segments"] for e in s["files"].values()] + [m[k] for k in ("trained", "tombstones")
                                                                          if m.get(k)]

    def _load_tombstones(self) -> np.ndarray:
        entry = self.manifest.get("tombstones")
        if not entry:
            return np.zeros(0, np.int64)
        path = store.check_size(self.path, self.name, entry)
        if self._verify_reads:
            store.verify_file(self.path, self.name, entry)
        try:
            dead = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise store.corrupt(self.name, f"{entry['name']}: {e}") from None
        if dead.dtype != np.int64 or dead.ndim != 1:
            raise store.corrupt(self.name, f"{entry['name']} is not a list of rows")
        return dead

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, db: str | Path, home: str | Path | None = None, verify: bool | None = None) -> "Database":
        """Open a database by name or folder; clear errors when it is missing, unfinished or corrupt.

        verify: None checks every digest of databases up to VERIFY_ON_OPEN bytes (larger ones as files are
        read), True checks every digest now, False only sizes.
        """
        path = store.resolve(db, home)
        name = path.name
        for _attempt in range(5):  # a writer may commit (and delete old files) between manifest and files
            try:
                return cls(path, store.read_manifest(path, name), verify)
            except FileNotFoundError:
                if not (path / store.MANIFEST).is_file():
                    break
        if (path / ".build").is_dir():
            raise DatabaseError(f"database {name} has an unfinished build and no finished version; run "
                                f"`rdm build-index SOURCE --name {name} --resume` to finish it")
        if (path / store.MANIFEST).is_file():
            raise store.corrupt(name, "a data file named in its manifest is missing")
        existing = store.list_databases(home)
        hint = _how_to_make(str(db))
        raise DatabaseError(f"no database '{db}' in {store.indexes_home(home)}; existing: "
                            f"{', '.join(existing) if existing else 'none'}"
                            + (f"; make it with `{hint}`" if hint else " (create one with rdm build-index SOURCE "
                               f"--name {db})"))

    def reopen(self) -> "Database":
        return Database.open(self.path, verify=False)

    # -- properties ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Live items (removed ones excluded)."""
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.identity.dim)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def total_rows(self) -> int:
        return int(self.manifest["rows"])

    def _segment_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def is_live(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        dead = np.isin(rows, self.tombstones) if len(self.tombstones) else np.zeros(rows.shape, bool)
        return (rows >= 0) & (rows < self.total_rows) & ~dead

    def live_rows(self) -> np.ndarray:
        """The live rows, in order (reads no files)."""
        parts = [np.arange(s.start, s.start + s.rows, dtype=np.int64) for s in self.segments]
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return rows[~np.isin(rows, self.tombstones)] if len(self.tombstones) else rows

    @property
    def ids(self) -> list[str]:
        """Ids of the live items, in row order (reads every segment's metadata)."""
        return [r["id"] for r in self.records(self.live_rows())]

    @property
    def vectors(self) -> np.ndarray:
        """(count, D) float32 vectors of the live items, in row order (materialised: small databases)."""
        return self.vectors_at(self.live_rows())

    @property
    def metadata(self) -> pa.Table:
        """Metadata of the live items, in row order (materialised)."""
        tables = []
        for seg in self.segments:
            local = np.arange(seg.rows)
            if len(self.tombstones):
                local = local[~np.isin(local + seg.start, self.tombstones)]
            tables.append(seg.metadata.take(pa.array(local)))
        if not tables:
            return rows_to_table([])
        return pa.concat_tables(tables, promote_options="permissive")

    def column_names(self) -> list[str]:
        names: list[str] = []
        for seg in self.segments:
            names += [c for c in seg.column_names() if c not in names]
        return names or list(BASE_COLUMNS)

    def skipped_list(self) -> list[dict]:
        return [r for seg in self.segments for r in seg.skipped().to_pylist()]

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors at `rows` (any shape) as float32; zero vectors where rows are -1."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        out = np.zeros((len(flat), self.dim), np.float32)
        valid = np.nonzero(flat >= 0)[0]
        if len(valid):
            pick = valid[np.argsort(flat[valid], kind="stable")]  # ascending reads, one sort for all segments
            wanted = flat[pick]
            bounds = np.searchsorted(wanted, np.append(self.starts, self.total_rows))
            for s in np.nonzero(np.diff(bounds))[0]:  # the segments holding some of the rows
                seg, lo, hi = self.segments[s], bounds[s], bounds[s + 1]
                local = wanted[lo:hi] - seg.start
                out[pick[lo:hi]] = seg.read_rows(local)  # preads: nothing mapped, RSS stays that of the results
        return out.reshape(*rows.shape, self.dim)

    def records(self, rows: Sequence[int]) -> list[dict]:
        """Metadata rows as dicts (id first), in the order given."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) == 0:
            return []
        out: list[dict | None] = [None] * len(rows)
        seg_of = self._segment_of(rows)
        for s in np.unique(seg_of):
            pick = np.nonzero(seg_of == s)[0]
            seg = self.segments[s]
            table, local = seg.metadata, rows[pick] - seg.start
            if len(local) <= 32:  # a search's hits: slicing costs ~0.01 ms a row, a take ~0.4 ms a call
                recs = [table.slice(int(r), 1).to_pylist()[0] for r in local]
            else:
                recs = table.take(pa.array(local)).to_pylist()
            for i, rec in zip(pick, recs):
                out[i] = rec
        return out  # type: ignore[return-value]

    def rows_of(self, ids: Sequence[str]) -> dict[str, int]:
        """Live rows of the given ids that the database holds (hash lookup per segment)."""
        ids = list(dict.fromkeys(ids))
        found: dict[str, int] = {}
        for seg in reversed(self.segments):  # a re-added id lives in a later segment
            todo = [i for i in ids if i not in found]
            if not todo:
                break
            for ident, local in seg.rows_of(todo).items():
                row = seg.start + local
                if self.is_live(np.array([row]))[0]:
                    found[ident] = row
        return found

    # -- search -------------------------------------------------------------------------------
    def filter_rows(self, where: Mapping[str, Sequence[str]] | Sequence[str] | None) -> np.ndarray | None:
        """Live rows matching all columns' filters (any of a column's values); None when unfiltered."""
        where = parse_where(where)
        if not where:
            return None
        columns = self.column_names()
        for col in where:
            if col not in columns:
                raise NotFound(f"database {self.name} has no column '{col}'; columns: {', '.join(columns)}")
        parts = []
        for seg in self.segments:
            mask = None
            for col, values in where.items():
                if col not in seg.metadata.column_names:
                    hit = pa.array(np.zeros(seg.rows, bool))
                else:
                    column = seg.metadata.column(col)
                    as_text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string(), safe=False)
                    hit = pc.fill_null(pc.is_in(as_text, value_set=pa.array(values, pa.string())), False)
                mask = hit if mask is None else pc.and_(mask, hit)
            parts.append(np.nonzero(mask.to_numpy(zero_copy_only=False))[0].astype(np.int64) + seg.start)
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return rows[self.is_live(rows)]

    def search(self, queries: np.ndarray, k: int = 10, where=None, records: bool = True) -> SearchResult:
        """k nearest live items of each query (Q, D); filters and removals apply inside the search."""
        if k < 1:
            raise RDMError(f"k must be at least 1, got {k}")
        queries = faiss_index.normalise(faiss_index.check_vectors(queries, self.dim, "query embeddings"))
        allowed = self.filter_rows(where)
        if allowed is not None and len(allowed) <= FILTER_EXACT_MAX:
            scores, pos = faiss_index.exact_topk(queries, self.vectors_at(allowed), k)
            rows = np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1) if len(allowed) else pos
        elif self.spec.exact:
            scores, rows = self._exact_search(queries, k, allowed)
        else:
            scores, rows = self._index_search(queries, k, allowed, self.spec)
        return self._result(scores, rows, records)

    def _result(self, scores: np.ndarray, rows: np.ndarray, records: bool) -> SearchResult:
        recs: list = []
        if records:
            flat = self.records(rows[rows >= 0])
            if self.licence_rule is not None:  # search shows every item; generation retrieves allowed ones only
                for r in flat:
                    r["licence_allowed"] = self.licence_rule.allows(r)
            it = iter(flat)
            recs = [[next(it) for r in row if r >= 0] for row in rows]
        return SearchResult(scores=scores, rows=rows, vectors=self.vectors_at(rows), records=recs, database=self.name)

    def _exact_search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored vectors, read block by block; removed or filtered-out rows score -inf."""
        best_s = np.full((len(queries), 0), -np.inf, np.float32)
        best_r = np.full((len(queries), 0), -1, np.int64)
        for seg in self.segments:
            for lo in range(0, seg.rows, EXACT_CHUNK):
                block = np.asarray(seg.read_block(lo, lo + EXACT_CHUNK), np.float32)
                rows = np.arange(seg.start + lo, seg.start + lo + len(block), dtype=np.int64)
                sims = queries @ block.T  # (Q, n)
                keep = self.is_live(rows) if len(self.tombstones) else None
                if allowed is not None:
                    inside = np.isin(rows, allowed)
                    keep = inside if keep is None else keep & inside
                if keep is not None:
                    sims[:, ~keep] = -np.inf
                m = min(k, len(rows))
                top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
                best_s, best_r = faiss_index.merge_topk(
                    np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1),
                    np.concatenate([best_r, rows[top]], 1), k)
        return faiss_index.merge_topk(best_s, best_r, k)

    def stacked_index(self) -> faiss_index.StackedIndex:
        """The segments' shares of the index, stacked (memory-mapped on first use)."""
        with self._lock:
            return self._stack()

    def _stack(self) -> faiss_index.StackedIndex:
        if self._stacked is None:
            entry = self.manifest["trained"]
            path = store.verify_file(self.path, self.name, entry)
            try:
                self._trained = faiss_index.deserialize(path.read_bytes())
                parts = [str(self.path / s.entry["files"]["index"]["name"]) for s in self.segments]
                self._stacked = faiss_index.StackedIndex(self._trained, parts, self.total_rows)
            except (RuntimeError, KeyError) as e:
                raise store.corrupt(self.name, f"its index cannot be read ({str(e).splitlines()[0]})") from None
        return self._stacked

    def _index_search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                      spec: faiss_index.IndexSpec) -> tuple[np.ndarray, np.ndarray]:
        """Approximate candidates (removed rows excluded by an IDSelector inside FAISS), re-scored exactly."""
        import faiss

        stacked = self.stacked_index()
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
            pool = len(allowed)
        elif len(self.tombstones):
            selector, pool = self._tombstone_selector(), self.count
        else:
            selector, pool = None, self.count
        fetch = max(1, min(k * max(spec.rerank, 1), pool))
        cand = stacked.search(queries, fetch, spec.nprobe or 1, selector)
        sims = np.empty(cand.shape, np.float32)
        step = max(1, RERANK_BYTES // (fetch * self.dim * 4))  # queries per block: (step, fetch, D) stays small
        for lo in range(0, len(queries), step):
            c = cand[lo:lo + step]
            vecs = self.vectors_at(c)  # exact scores from the stored vectors; -1 padding scores -inf
            sims[lo:lo + step] = np.where(c >= 0, np.einsum("qd,qkd->qk", queries[lo:lo + step], vecs), -np.inf)
        return faiss_index.merge_topk(sims, cand, k)

    def _tombstone_selector(self):
        """IDSelectorNot over the tombstones, made once per opened generation (0.5 ms for 10k of them)."""
        import faiss

        with self._lock:
            if self._selector is None:
                batch = faiss.IDSelectorBatch(self.tombstones)
                self._selector = faiss.IDSelectorNot(batch)
                self._selector.referenced = batch  # the Not selector does not own the batch it negates
            return self._selector

    def warm(self, background: bool = True, skip: set | None = None):
        """Read the index shares (every search scans them), then the vectors (candidates are re-scored from
        them), into the page cache, sequentially; as much as fits in memory (rdm.db.warm). What a long-running
        service does once per database; files in `skip` are left alone and the rest are added to it."""
        from .warm import warm

        files = [] if self.spec.exact else [self.path / s.entry["files"]["index"]["name"] for s in self.segments]
        files += [self.path / s.entry["files"]["vectors"]["name"] for s in self.segments]
        if skip is not None:
            files = [f for f in files if f not in skip]
            skip.update(files)
        return warm(files, background=background)

    # -- writing ------------------------------------------------------------------------------
    def coarse_lists(self, vectors: np.ndarray, n: int = 1) -> np.ndarray | None:
        """The n nearest inverted lists of each vector in this database's trained index; None for an exact one."""
        trained = self._trained_index()
        return None if trained is None else faiss_index.coarse_lists(trained, vectors, n)

    def _trained_index(self):
        if self.spec.exact:
            return None
        self.stacked_index()
        return self._trained

    def add(self, vectors: np.ndarray, rows: Sequence[Mapping[str, Any]], source: dict | None = None,
            skipped: Sequence[Mapping[str, Any]] = ()) -> int:
        """Append items as one new segment (ids already present are ignored); return how many were added."""
        vectors = faiss_index.normalise(faiss_index.check_vectors(vectors, self.dim, "new embeddings"))
        if len(rows) != len(vectors):
            raise RDMError(f"{len(vectors)} vectors but {len(rows)} metadata rows")
        with store.writer_lock(self.path, self.name):
            db = self.reopen()  # the latest commit, whoever made it
            present = set(db.rows_of([r["id"] for r in rows]))
            keep = [i for i, r in enumerate(rows) if r["id"] not in present and not present.add(r["id"])]
            if not keep and not skipped:
                return 0
            m = dict(db.manifest)
            entry = write_segment(self.path, m["rows"], vectors[keep], rows_to_table([rows[i] for i in keep]),
                                  skipped_table(skipped), m.get("vector_dtype", "float32"))
            trained = db._trained_index()
            if trained is not None:
                entry = write_segment_index(self.path, entry, faiss_index.encode(trained, vectors[keep], entry["start"]),
                                            db.spec.tag)
            m["segments"] = m["segments"] + [entry]
            if source:
                m["sources"] = m.get("sources", []) + [dict(source, added=store.now())]
            fault("add:before-commit")
            store.commit(self.path, finish_manifest(m, len(db.tombstones)), fault=lambda p: fault(f"add:{p}"))
        self._reload()
        return len(keep)

    def remove(self, ids: Sequence[str] = (), where=None, reason: dict | None = None) -> list[str]:
        """Remove items by id and/or metadata filter (takedowns): a new tombstone set; return removed ids.

        reason: recorded with the removed ids (the first HISTORY_IDS of them, and their count) in the manifest's
        `history`, in the same commit (rdm curate --apply says what it removed and why)."""
        if not ids and not where:
            raise RDMError("nothing to remove: give ids or a --where filter")
        with store.writer_lock(self.path, self.name):
            db = self.reopen()
            found = db.rows_of(list(ids))
            unknown = sorted(set(ids) - set(found))
            if unknown:
                raise NotFound(f"database {self.name} has no item(s) {', '.join(unknown[:10])}"
                               f"{' ...' if len(unknown) > 10 else ''}; nothing was removed")
            drop = np.array(sorted(found.values()), np.int64)
            if where:
                drop = np.union1d(drop, db.filter_rows(where))
            if len(drop) == 0:
                return []
            removed = [r["id"] for r in db.records(drop)]
            dead = np.union1d(db.tombstones, drop).astype(np.int64)
            path = self.path / f"tombstones.{store.new_generation()}.npy"
            written = store.atomic_write(path, lambda f: np.save(f, dead, allow_pickle=False))
            m = dict(db.manifest, tombstones=dict(store.file_entry(self.path, path, written), count=int(len(dead))))
            if reason is not None:
                entry = {"at": store.now(), "removed": len(removed), "ids": removed[:HISTORY_IDS],
                         **reason}
                m["history"] = list(db.manifest.get("history", []))[-(HISTORY_KEEP - 1):] + [entry]
            fault("remove:before-commit")
            store.commit(self.path, finish_manifest(m, len(dead)), fault=lambda p: fault(f"remove:{p}"))
        self._reload()
        return removed

    def compact(self, progress: bool = False) -> dict:
        """Merge the segments into as few as SEGMENT_ROWS allows, dropping removed rows; resumable."""
        from .compaction import compact

        with store.writer_lock(self.path, self.name):
            report = compact(self.reopen(), progress=progress)
        self._reload()
        return report

    def _reload(self) -> None:
        fresh = self.reopen()
        self.__dict__.update(fresh.__dict__)

    # -- checking and describing ---------------------------------------------------------------
    def verify(self) -> dict:
        """Check every file's size and digest, and that the files agree (`rdm verify`)."""
        entries = self._entries()
        for e in entries:
            store.verify_file(self.path, self.name, e)
        for seg in self.segments:
            if seg.metadata.num_rows != seg.rows:
                raise store.corrupt(self.name, f"segment {seg.id}'s metadata and vectors disagree")
        if not self.spec.exact:
            self.stacked_index()
        return {"name": self.name, "files": len(entries), "bytes": sum(e["bytes"] for e in entries),
                "segments": len(self.segments), "count": self.count, "ok": True}

    def info(self) -> dict:
        """What `rdm info --json` prints."""
        return store.manifest_info(self.path, self.manifest) | {"columns": self.column_names(),
                                                                "skipped": self.skipped_list()}


def _how_to_make(name: str) -> str | None:
    """The command that makes a well-known database (rdm.models.assets knows the published ones)."""
    from ..models.assets import how_to_make

    return how_to_make(name)
