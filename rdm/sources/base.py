"""Sources: where a database's items come from, in a stable order, with ids and metadata.

Three kinds, one contract (`Source.iter_items(start)` yields `Item`s in a fixed order):
  FolderSource       a folder of images: recursive, sorted, ids = relative paths; an imagefolder-style
                     metadata.jsonl / metadata.csv (column file_name) at the root adds captions/columns.
  HFDatasetSource    a Hugging Face dataset: a hub name (e.g. huggan/wikiart) or a local path
                     (save_to_disk folder, imagefolder, parquet files); streaming for large sets.
                     Dataset scripts are never run (datasets >= 4 does not run them at all).
  EmbeddingsSource   precomputed vectors: .npy, .parquet with an embedding column, or CompVis's
                     .npz retrieval databases (keys embedding, img_id, patch_coords).
  WebDatasetSource, ParquetImageSource (rdm.sources.webdataset): img2dataset's tar shards
                     (`shards/{00000..00099}.tar`) and parquet output, and parquets of image paths.
`open_source(spec)` picks the kind from what `spec` is.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SourceError
from ..images.decode import IMAGE_EXTENSIONS, SkipPayload

CAPTION_COLUMNS = ("caption", "text", "captions", "prompt", "title", "description")
EMBEDDING_COLUMNS = ("embedding", "embeddings", "clip_embedding", "image_embedding", "emb")
ID_COLUMNS = ("id", "img_id", "image_id", "key")


@dataclass
class Item:
    """One entry of a source: what to embed (payload or embedding) and what to remember (meta)."""

    index: int  # position in the source's stable order (resume restarts from an index)
    id: str  # unique, stable id (relative path, dataset row, img_id)
    payload: str | bytes | None = None  # image path or encoded bytes; None when `embedding` is given
    embedding: np.ndarray | None = None  # precomputed vector (EmbeddingsSource)
    meta: dict[str, Any] = field(default_factory=dict)  # path, source_row, caption, extra columns


class Source(Protocol):
    kind: str  # "images" or "embeddings"

    def describe(self) -> dict: ...  # recorded in the database manifest
    def __len__(self) -> int: ...  # number of items, or -1 when unknown (streaming)
    def iter_items(self, start: int = 0) -> Iterator[Item]: ...


def json_safe(value: Any) -> Any:
    """Metadata values as JSON-able scalars (lists/dicts kept, bytes and exotic types stringified)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)


# ---------------------------------------------------------------------------------------------
class FolderSource:
    """A folder of images, walked recursively in sorted order; ids are POSIX relative paths."""

    kind = "images"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"source folder {root} does not exist (give a folder of images, a dataset "
                              "name such as huggan/wikiart, or an embeddings file)")
        self.files = self._list()
        self.extra = self._read_metadata_file()

    def _list(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(found)

    def _read_metadata_file(self) -> dict[str, dict]:
        """imagefolder convention: metadata.jsonl or metadata.csv at the root, keyed by file_name."""
        rows: list[dict] = []
        jsonl, csv_path = self.root / "metadata.jsonl", self.root / "metadata.csv"
        try:
            if jsonl.is_file():
                rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            elif csv_path.is_file():
                with open(csv_path, newline="") as f:
                    rows = list(csv.DictReader(f))
        except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read {jsonl if jsonl.is_file() else csv_path}: {e}") from None
        return {str(r.pop("file_name")): r for r in rows if "file_name" in r}

    def describe(self) -> dict:
        return {"type": "folder", "path": str(self.root), "files": len(self.files)}

    def __len__(self) -> int:
        return len(self.files)

    def iter_items(self, start: int = 0) -> Iterator[Item]:
        for i in range(start, len(self.files)):
            rel = self.files[i]
            meta = {"path": str(self.root / rel), "caption": None}
            extra = self.extra.get(rel, {})
            caption_key = next((c for c in CAPTION_COLUMNS if c in extra), None)
            if caption_key:
                meta["caption"] = extra[caption_key]
            meta.update({k: json_safe(v) for k, v in extra.items() if k != caption_key})
            path = self.root / rel
            payload = str(path)
            if not Path(os.path.realpath(path)).is_relative_to(self.root):  # a link out of the folder: not embedded
                payload = SkipPayload("outside-source", f"{rel} resolves outside {self.root}")
            yield Item(index=i, id=rel, payload=payload, meta=meta)


# ---------------------------------------------------------------------------------------------
class HFDatasetSource:
    """A Hugging Face dataset (hub name or local path); images are re-decoded by rdm.images.decode."""

    kind = "images"

    def __init__(self, spec: str, split: str = "train", image_column: str | None = None,
                 caption_column: str | None = None, streaming: bool = False):
        import datasets  # heavy; only needed for this source

        self.spec, self.split, self.streaming = spec, split, streaming
        self.dataset = self._load(datasets, spec, split, streaming)
        features = self.dataset.features
        if features is None:  # streaming without resolved features
            self.dataset = self.dataset._resolve_features()
            features = self.dataset.features
        self.image_column = image_column or next(
            (c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if self.image_column is None or self.image_column not in features:
            raise SourceError(f"dataset {spec} has no image column {image_column or ''}; columns: "
                              f"{', '.join(features)} (choose one with --image-column)")
        if caption_column and caption_column not in features:
            raise SourceError(f"dataset {spec} has no column '{caption_column}'; columns: {', '.join(features)}")
        self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in features), None)
        self.labels = {c: f for c, f in features.items() if isinstance(f, datasets.ClassLabel)}
        self.dataset = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))

    @staticmethod
    def _load(datasets, spec: str, split: str, streaming: bool):
        path = Path(spec).expanduser()
        try:
            if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                                  or (path / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise SourceError(f"{spec} has no split '{split}'; splits: {', '.join(ds)}")
                    ds = ds[split]
                return ds.to_iterable_dataset() if streaming else ds
            if path.is_file() and path.suffix == ".parquet" or path.is_dir() and any(path.glob("*.parquet")):
                files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
                return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
            if path.is_dir():
                return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming)
            if path.suffix == ".py":
                raise SourceError(f"{spec}: dataset scripts are never run; use a data-only dataset")
            return datasets.load_dataset(spec, split=split, streaming=streaming)
        except SourceError:
            raise
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            raise SourceError(
                f"cannot load dataset '{spec}' (split {split}): {e}\n  Offline, download it once elsewhere "
                "and pass the local folder (save_to_disk, imagefolder or parquet files).") from None
        except Exception as e:  # datasets raises its own hierarchy (DatasetNotFoundError, ...)
            raise SourceError(f"cannot load dataset '{spec}' (split {split}): {type(e).__name__}: {e}") from None

    def describe(self) -> dict:
        return {"type": "hf-dataset", "name": self.spec, "split": self.split, "streaming": self.streaming,
                "image_column": self.image_column, "caption_column": self.caption_column}

    def __len__(self) -> int:
        try:
            return len(self.dataset)
        except TypeError:
            info = getattr(self.dataset, "info", None)
            splits = getattr(info, "splits", None) or {}
            return int(splits[self.split].num_examples) if self.split in splits else -1

    def _meta(self, row: dict, index: int, image: dict) -> dict:
        meta: dict[str, Any] = {"path": image.get("path"), "source_row": index,
                                "caption": row.get(self.caption_column) if self.caption_column else None}
        for col, value in row.items():
            if col in (self.image_column, self.caption_column):
                continue
            if col in self.labels and isinstance(value, int) and value >= 0:
                value = self.labels[col].int2str(value)
            if isinstance(value, (dict, list)) and any(isinstance(v, (bytes, dict)) for v in
                                                       (value.values() if isinstance(value, dict) else value)):
                continue  # nested media columns are not metadata
            meta[col] = json_safe(value)
        return meta

    def iter_items(self, start: int = 0) -> Iterator[Item]:
        ds = self.dataset.skip(start) if self.streaming else self.dataset
        rows = iter(ds) if self.streaming else (ds[i] for i in range(start, len(ds)))
        for index, row in enumerate(rows, start=start):
            image = row.get(self.image_column) or {}
            payload = image.get("bytes") or image.get("path")
            yield Item(index=index, id=f"{self.split}/{index}", payload=payload, meta=self._meta(row, index, image))


# ---------------------------------------------------------------------------------------------
class EmbeddingsSource:
    """Precomputed embeddings: .npy (N, D); .parquet with an embedding column; CompVis .npz."""

    kind = "embeddings"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise SourceError(f"embeddings file {path} does not exist")
        self.vectors, self.ids, self.meta = self._read()
        if self.vectors.ndim != 2 or self.vectors.shape[0] == 0:
            raise SourceError(f"{path}: expected a non-empty (N, D) array of embeddings, got {self.vectors.shape}")
        if self.ids is not None and len(set(self.ids)) != len(self.ids):
            raise SourceError(f"{path}: ids are not unique")

    def _read(self) -> tuple[np.ndarray, list[str] | None, list[dict] | None]:
        """(vectors, ids, metadata); a .npy is memory-mapped and its ids are its row numbers (None: implied)."""
        suffix = self.path.suffix.lower()
        try:
            if suffix == ".npy":
                return np.load(self.path, mmap_mode="r", allow_pickle=False), None, None
            if suffix == ".npz":
                return self._read_compvis_npz()
            if suffix == ".parquet":
                return self._read_parquet()
        except (ValueError, OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read embeddings from {self.path}: {e}") from None
        raise SourceError(f"{self.path}: embeddings must be .npy, .npz (CompVis) or .parquet")

    def _read_compvis_npz(self):
        """CompVis retrieval database: embedding (N, D), img_id (N,), patch_coords (N, 4) optional."""
        with np.load(self.path, allow_pickle=False) as z:
            if "embedding" not in z:
                raise SourceError(f"{self.path}: a CompVis .npz database needs an 'embedding' array; "
                                  f"found {', '.join(z.files)}")
            vec = np.asarray(z["embedding"])
            img_id = [str(x) for x in z["img_id"]] if "img_id" in z else [str(i) for i in range(len(vec))]
            coords = np.asarray(z["patch_coords"]) if "patch_coords" in z else None
        patched = len(set(img_id)) != len(img_id)  # several patches per image: ids become IMG#n
        ids, meta, seen = [], [], {}
        for i, base in enumerate(img_id):
            n = seen[base] = seen.get(base, -1) + 1
            ids.append(f"{base}#{n}" if patched else base)
            m: dict[str, Any] = {"img_id": base}
            if coords is not None:
                m["patch_coords"] = [int(c) for c in np.ravel(coords[i])]
            meta.append(m)
        return vec, ids, meta

    def _read_parquet(self):
        table = pq.read_table(self.path, use_threads=False)  # apache/arrow#34314: see segment._read_table
        col = next((c for c in EMBEDDING_COLUMNS if c in table.column_names), None)
        if col is None:
            raise SourceError(f"{self.path}: no embedding column (one of {', '.join(EMBEDDING_COLUMNS)}); "
                              f"columns: {', '.join(table.column_names)}")
        vec = np.asarray(table.column(col).to_pylist(), dtype=np.float32)
        id_col = next((c for c in ID_COLUMNS if c in table.column_names), None)
        ids = [str(x) for x in table.column(id_col).to_pylist()] if id_col else [str(i) for i in range(len(vec))]
        rest = table.drop_columns([c for c in (col, id_col) if c])
        return vec, ids, [{k: json_safe(v) for k, v in r.items()} for r in rest.to_pylist()]

    def describe(self) -> dict:
        return {"type": "embeddings", "path": str(self.path), "count": len(self), "dim": int(self.vectors.shape[1])}

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def iter_blocks(self, start: int = 0, size: int = 65_536) -> Iterator[tuple[int, np.ndarray, list[str], list[dict]]]:
        """(first index, vectors (n, D) float32, ids, metadata) blocks from `start`, read from the file."""
        from .npy import read_npy_rows

        for lo in range(start, len(self), size):
            hi = min(lo + size, len(self))
            ids = [str(i) for i in range(lo, hi)] if self.ids is None else self.ids[lo:hi]
            meta = [{} for _ in range(hi - lo)] if self.meta is None else self.meta[lo:hi]
            meta = [dict(m, path=None, caption=m.get("caption")) for m in meta]
            if isinstance(self.vectors, np.memmap):  # a .npy: read, not mapped (RSS stays flat as N grows)
                block = read_npy_rows(self.path, lo, hi)
            else:
                block = self.vectors[lo:hi]
            yield lo, np.asarray(block, np.float32), ids, meta

    def iter_items(self, start: int = 0) -> Iterator[Item]:
        for lo, block, ids, meta in self.iter_blocks(start):
            for j in range(len(ids)):
                yield Item(index=lo + j, id=ids[j], embedding=block[j], meta=meta[j])
