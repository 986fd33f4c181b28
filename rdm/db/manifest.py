"""The parts of a database manifest that builds, compaction and the Database share: metadata tables, the
vectors' dtype, a new manifest and its finished counts and fingerprint, and fault injection for tests."""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Mapping, Sequence

import pyarrow as pa

from ..embed.identity import EmbedderIdentity
from ..errors import RDMError
from . import faiss_index, store

SEGMENT_ROWS = 262_144  # rows per segment written by compaction and by builds from vector files
FLOAT16_ABOVE = 1_000_000  # databases with more vectors store them as float16 by default (see README)
FAULT_ENV = "RDM_FAULT"  # fault injection for tests: "NAME:POINT" kills this process with SIGKILL
BASE_COLUMNS = {"id": pa.string(), "path": pa.string(), "source_row": pa.int64(), "width": pa.int64(),
                "height": pa.int64(), "caption": pa.string()}
SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string())])


def fault(point: str) -> None:
    """Kill this process with SIGKILL at a named point when $RDM_FAULT asks for it (tests only)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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


def choose_dtype(expected_count: int, asked: str | None = None) -> str:
    """The stored vectors' dtype: as asked, else float16 above FLOAT16_ABOVE vectors, else float32."""
    if asked:
        if asked not in ("float32", "float16"):
            raise RDMError(f"--vector-dtype must be float32 or float16, got {asked}")
        return asked
    return "float16" if expected_count > FLOAT16_ABOVE else "float32"


def new_manifest(name: str, identity: EmbedderIdentity, spec: faiss_index.IndexSpec, vector_dtype: str,
                 sources: list[dict], created: str | None = None) -> dict:
    """The manifest of an empty database (segments are added by the caller)."""
    return {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "name": name,
            "created": created or store.now(), "updated": store.now(), "embedder": identity.to_dict(),
            "dim": identity.dim, "metric": spec.metric, "vector_dtype": vector_dtype,
            "index_factory": spec.factory, "index": spec.to_dict(), "trained": None, "segments": [],
            "tombstones": None, "count": 0, "rows": 0, "skipped_count": 0, "sources": sources}


def finish_manifest(m: dict, tombstone_count: int = 0) -> dict:
    """Recompute the counts and the fingerprint from the segments and tombstones."""
    m["rows"] = max([s["start"] + s["rows"] for s in m["segments"]], default=m.get("rows", 0))
    m["count"] = sum(s["rows"] for s in m["segments"]) - tombstone_count
    m["skipped_count"] = sum(s.get("skipped", 0) for s in m["segments"])
    m["updated"] = store.now()
    parts = [f"{s['id']}:" + ",".join(e[store.HASH] for _, e in sorted(s["files"].items())) for s in m["segments"]]
    parts += [f"{k}:{m[k][store.HASH]}" for k in ("trained", "tombstones") if m.get(k)]
    m["fingerprint"] = store.fingerprint(parts)
    return m
