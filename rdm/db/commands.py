"""The database commands as plain functions (`rdm list/info/search/remove/compact/verify/licence`): each opens the
database by name (or folder) in a databases home and does one thing; `rdm.api` re-exports them for notebooks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import NotFound, RDMError
from ..util.files import human_size
from . import open_database, store

if TYPE_CHECKING:
    import numpy as np

    from ..embed.embedder import Embedder


def set_licence(db: str | Path, column: str | None = None, allow: Sequence[str] | str = (),
                attribution: str | None = None, clear: bool = False, indexes: str | None = None):
    """`rdm licence`: set (or clear, or with no arguments read) a database's licence rule (rdm.db.licence)."""
    from .licence import LicenceRule, parse_allow, read_rule, write_rule

    database = open_database(db, indexes)
    if clear:
        write_rule(database.path, None)
        return None
    if column is None and not allow and attribution is None:
        return read_rule(database.path, database.name)
    before = read_rule(database.path, database.name)
    if attribution is None and before is not None:  # a new list of licences keeps the credits' column
        attribution = before.attribution
    rule = LicenceRule(column or (before.column if before else ""), parse_allow(allow), attribution)
    columns = database.column_names()
    for col in filter(None, (rule.column, rule.attribution)):
        if col not in columns:
            raise NotFound(f"database {database.name} has no column '{col}'; columns: {', '.join(columns)}")
    write_rule(database.path, rule)
    return rule


def list_databases(indexes: str | None = None) -> list[dict]:
    """Name, count, dim, index and embedder of each database in the home (manifests only)."""
    out = []
    for name in store.list_databases(indexes):
        try:
            m = store.read_manifest(store.resolve(name, indexes), name)
            out.append({"name": name, "count": m["count"], "dim": m["dim"], "index_factory": m["index_factory"],
                        "embedder": m["embedder"]["model"]})
        except RDMError as e:
            out.append({"name": name, "count": 0, "dim": 0, "index_factory": "?", "embedder": f"unreadable: {e}"})
    return out


def info(db: str, indexes: str | None = None, skipped: bool = True) -> dict:
    """`rdm info`: the manifest alone (segments record their columns); `skipped` adds the small skipped lists."""
    path = store.resolve(db, indexes)
    try:
        m = store.read_manifest(path, path.name)
    except FileNotFoundError:
        open_database(db, indexes)  # raises the clear error: missing, unfinished, ...
        raise
    d = store.manifest_info(path, m)
    if skipped:
        import pyarrow.parquet as pq

        try:
            d["skipped"] = [r for seg in m["segments"]
                            for r in pq.read_table(path / seg["files"]["skipped"]["name"], use_threads=False).to_pylist()]
        except (OSError, ValueError) as e:
            raise store.corrupt(path.name, f"a segment cannot be read ({e})") from None
    return d




def format_info(d: dict) -> str:
    e = d["embedder"]
    idx = d["index"]
    recall = idx.get("recall_at_10")
    lines = [f"{d['name']}  ({d['path']})",
             f"  items      {d['count']}" + (f" ({d['removed']} removed, until rdm compact)" if d.get("removed") else ""),
             f"  dim        {d['dim']} ({d.get('vector_dtype', 'float32')} vectors, {d.get('segments', 1)} segment(s))",
             f"  embedder   {e['model']} (weights {(e.get('weights_sha256') or 'recorded by id')[:12]})",
             f"  index      {d['index_factory']}" + (f" (nprobe {idx['nprobe']}, rerank x{idx['rerank']})"
                                                     if idx.get("nprobe") else "")
             + (f", recall@10 {recall}" if recall is not None else "")
             + (f" (image {idx.get('recall_image')}, text {idx.get('recall_text')})" if idx.get("nprobe") else ""),
             f"  columns    {', '.join(d.get('columns', []))}", f"  created    {d['created']}",
             f"  fingerprint {d['fingerprint']}", f"  on disk    {human_size(d['bytes_on_disk'])}",
             f"  skipped    {d.get('skipped_count', len(d.get('skipped', [])))}"]
    lines += [f"    {s['path']}: {s['reason']}" for s in d.get("skipped", [])[:20]]
    return "\n".join(lines)


def embed_queries(embedder: "Embedder", texts: Sequence[str], images: Sequence[str]) -> tuple[list[str], "np.ndarray"]:
    """Text and image queries -> (labels, (Q, D) vectors), texts first, in the order given."""
    import numpy as np

    for t in texts:
        if not t.strip():
            raise RDMError("empty text query")
    vectors = [embedder.encode_text(list(texts))] if texts else []
    if images:
        vectors.append(embedder.encode_image_files(list(images)))
    if not vectors:
        raise RDMError("give at least one query: TEXT arguments or --image PATH")
    return list(texts) + [f"image: {p}" for p in images], np.concatenate(vectors)


def search(db: str, texts: Sequence[str], images: Sequence[str] = (), k: int = 10, where: Sequence[str] = (),
           indexes: str | None = None, device: str | None = None) -> tuple[list[str], list[list[dict]]]:
    """`rdm search`: one list of hits (id, score, row, metadata) per query, in order."""
    database = open_database(db, indexes)
    from ..embed import embedder_for

    embedder = embedder_for(database, device)
    labels, queries = embed_queries(embedder, texts, images)
    result = database.search(queries, k=k, where=where)
    return labels, [result.hits(q) for q in range(len(labels))]


def remove(db: str, ids: Sequence[str], where: Sequence[str], indexes: str | None = None) -> tuple[list[str], int]:
    """`rdm remove`: tombstone items by id or filter; return (removed ids, items left)."""
    database = open_database(db, indexes)
    removed = database.remove(ids=ids, where=where)
    return removed, database.count


def compact(db: str, indexes: str | None = None, progress: bool = True) -> dict:
    """`rdm compact`: merge segments, drop removed rows (resumes a killed compaction)."""
    return open_database(db, indexes).compact(progress=progress)


def verify(db: str, indexes: str | None = None) -> dict:
    """`rdm verify`: check every file's size and digest."""
    from .database import Database

    return Database.open(db, indexes, verify=False).verify()


__all__ = ["compact", "embed_queries", "format_info", "info", "list_databases", "remove", "search", "set_licence",
           "verify"]
