"""`rdm compact`: merge a database's segments and drop removed rows, atomically and resumably.

The live rows are copied, in row order, into new segments of up to SEGMENT_ROWS rows, renumbered
from 0, each encoded with the database's trained index (the training is kept). Every finished
output segment is recorded in .compact/progress.json, so a killed compaction resumes after the last
one; the input is named by its fingerprint, and a compaction of another state starts again. The new
segments replace the old ones in one manifest commit; until then readers use the old ones.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from . import faiss_index, manifest, store
from .manifest import fault, finish_manifest, rows_to_table, skipped_table
from .segment import write_segment, write_segment_index

if TYPE_CHECKING:
    from .database import Database

WORK = ".compact"


def _load_progress(work, fingerprint: str) -> dict:
    progress = work / store.PROGRESS
    if progress.is_file():
        try:
            state = json.loads(progress.read_text())
            if state.get("from") == fingerprint:
                return state
        except (json.JSONDecodeError, OSError):
            pass
    return {"from": fingerprint, "segments": [], "files": [], "done_rows": 0}


def compact(db: Database, progress: bool = False) -> dict:
    """Compact `db` (the caller holds the writer lock); return a report."""
    started = time.perf_counter()
    work = db.path / WORK
    work.mkdir(exist_ok=True)
    state = _load_progress(work, db.fingerprint)
    live = db.live_rows()
    trained = db._trained_index()
    skipped = pa.concat_tables([s.skipped() for s in db.segments]) if db.segments else skipped_table([])
    resumed = len(state["segments"])
    bar = tqdm(total=len(live), initial=state["done_rows"], unit="row", desc="compacting", disable=not progress)
    while state["done_rows"] < len(live) or not state["segments"]:
        lo = state["done_rows"]
        rows = live[lo:lo + manifest.SEGMENT_ROWS]
        vectors = db.vectors_at(rows)
        metadata = _metadata_of(db, rows)
        entry = write_segment(db.path, lo, vectors, metadata, skipped if lo == 0 else skipped_table([]),
                              db.manifest.get("vector_dtype", "float32"))
        if trained is not None:
            entry = write_segment_index(db.path, entry, faiss_index.encode(trained, vectors, lo), db.spec.tag)
        state["segments"].append(entry)
        state["files"] += [e["name"] for e in entry["files"].values()]
        state["done_rows"] = lo + len(rows)
        store.atomic_write_json(work / store.PROGRESS, state)
        bar.update(len(rows))
        fault(f"compact:after-segment:{len(state['segments']) - 1}")
    bar.close()
    m = dict(db.manifest, segments=state["segments"], tombstones=None, rows=0)
    m = finish_manifest(m, 0)
    fault("compact:before-commit")
    store.commit(db.path, m, fault=lambda p: fault(f"compact:{p}"))
    shutil.rmtree(work, ignore_errors=True)
    return {"name": db.name, "segments_before": len(db.segments), "segments_after": len(m["segments"]),
            "removed_rows_dropped": int(len(db.tombstones)), "count": m["count"],
            "resumed_segments": resumed, "seconds": time.perf_counter() - started}


def _metadata_of(db: Database, rows: np.ndarray) -> pa.Table:
    """Metadata of the given (sorted) rows as one table, segment by segment."""
    seg_of = db._segment_of(rows)
    tables = []
    for s in np.unique(seg_of):
        seg = db.segments[s]
        tables.append(seg.metadata.take(pa.array(rows[seg_of == s] - seg.start)))
    if not tables:
        return rows_to_table([])
    return pa.concat_tables(tables, promote_options="permissive")
