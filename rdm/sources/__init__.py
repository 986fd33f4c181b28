"""Sources of images or vectors: folders, HF datasets, embeddings files, webdataset shards, image parquet.

`open_source(spec)` picks the kind; the kinds live in base (folders, datasets, embeddings) and webdataset."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import SourceError
from .base import *  # noqa: F401,F403 (every source kind, Item, the column names)
from .base import EMBEDDING_COLUMNS, EmbeddingsSource, FolderSource, HFDatasetSource, Source


# ---------------------------------------------------------------------------------------------
def open_source(spec: str, *, split: str = "train", image_column: str | None = None,
                caption_column: str | None = None, streaming: bool = False) -> Source:
    """Pick the source kind from `spec`: embeddings file, local dataset, image folder or hub dataset."""
    if not spec:
        raise SourceError("no source given: pass a folder of images, a dataset name or an embeddings file")
    hf_opts = dict(split=split, image_column=image_column, caption_column=caption_column, streaming=streaming)
    if spec.startswith("hf:"):
        return HFDatasetSource(spec[3:], **hf_opts)
    from .webdataset import ParquetImageSource, WebDatasetSource, is_image_parquet, is_shard_spec

    if is_shard_spec(spec):
        return WebDatasetSource(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".npy", ".npz"):
            return EmbeddingsSource(path)
        if path.suffix.lower() == ".parquet":
            names = pq.read_schema(path).names
            if any(c in names for c in EMBEDDING_COLUMNS):
                return EmbeddingsSource(path)
            if is_image_parquet(path) and not image_column:
                return ParquetImageSource(str(path))
            return HFDatasetSource(str(path), **hf_opts)
        raise SourceError(f"{spec} is a file rdm cannot read as a source (.npy, .npz, .parquet, or a folder)")
    if path.is_dir():
        is_saved = any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        has_parquet = any(path.glob("*.parquet"))
        if has_parquet and not (is_saved or image_column or streaming) and is_image_parquet(path):
            return ParquetImageSource(str(path))
        if is_saved or has_parquet or image_column or streaming:
            return HFDatasetSource(str(path), **hf_opts)
        return FolderSource(path)
    if os.sep in spec.strip("/") and spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return HFDatasetSource(spec, **hf_opts)
    raise SourceError(f"source {spec} does not exist: give a folder of images, an embeddings file "
                      "(.npy/.npz/.parquet), a local dataset folder, or a hub dataset as ORG/NAME")
