"""Sources big collections come in: img2dataset's webdataset tar shards and parquet files.

  WebDatasetSource     tar shards as img2dataset (or webdataset's TarWriter) writes them, given as a
                       brace pattern `shards/{00000..00099}.tar`, a glob `shards/*.tar`, one .tar, or
                       a folder of .tar files. A sample is the consecutive members KEY.jpg|png|webp|...
                       (the image), KEY.json (metadata columns) and KEY.txt (the caption); id = KEY.
                       Read with the standard library's tarfile. A truncated member, a corrupt header
                       or an unreadable shard is one skipped item ("truncated"), never a failed build.
  ParquetImageSource   img2dataset's parquet output (columns key, jpg, txt, url, caption, status,
                       error_message, width, height, original_width, original_height, ...), or any
                       parquet of local image paths (column image_path / path / file_path / filepath /
                       file_name) with metadata columns. Rows whose img2dataset status is not
                       "success" are skipped as "missing" (the download failed), with its error message.
Both keep the `Source` contract of rdm.sources: items in a stable order from any start index, so
builds resume and a parallel engine can read any range of items alone.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from ..errors import SourceError
from ..images.decode import IMAGE_EXTENSIONS, SkipPayload
from .base import CAPTION_COLUMNS, Item, json_safe

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # member suffixes that hold the image
PATH_COLUMNS = ("image_path", "path", "file_path", "filepath", "file_name", "filename")
BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
KEY_COLUMNS = ("key", "id", "image_id", "img_id")
SCAN_THREADS = 8  # shards whose headers are counted at once when a source is opened (I/O-bound)


# -- shard lists -----------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar a/001.tar a/002.tar; `{x,y}` lists; zero padding kept (webdataset's)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise SourceError(f"brace range {{{body}}} in {pattern} is not NUMBER..NUMBER")
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The tar shards a spec names: brace pattern, glob, one .tar or a folder of .tar (sorted)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not found:
            raise SourceError(f"{spec} holds no .tar shards")
        return [p.resolve() for p in found]
    if "{" in spec:
        found = [Path(p).expanduser() for p in expand_braces(spec)]
        missing = [p for p in found if not p.is_file()]
        if missing:
            raise SourceError(f"{len(missing)} of the {len(found)} shards of {spec} do not exist "
                              f"(first: {missing[0]}); "
                              "give the shards that exist (a folder of .tar, or a narrower pattern)")
        return [p.resolve() for p in found]
    if any(c in spec for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if p.endswith(".tar"))
        if not found:
            raise SourceError(f"no .tar shards match {spec}")
        return [p.resolve() for p in found]
    if path.is_file() and path.suffix == ".tar":
        return [path.resolve()]
    raise SourceError(f"{spec} is not a .tar shard, a folder of shards or a shard pattern")


def is_shard_spec(spec: str) -> bool:
    """Whether `spec` names webdataset shards (checked before the other source kinds)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir()}
        return ".tar" in suffixes and not suffixes & set(IMAGE_EXTENSIONS)
    return spec.endswith(".tar") and (path.is_file() or "{" in spec or any(c in spec for c in "*?["))


# -- one shard -------------------------------------------------------------------------------------
@dataclass
class _Sample:
    key: str  # the sample's key (member name up to the first dot of its base name)
    members: dict  # suffix -> TarInfo
    problem: tuple[str, str] | None = None  # (reason, detail) when the tar itself is broken here


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: 'dir/KEY.seg.jpg' -> ('dir/KEY', 'seg.jpg')."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _nonzero(fh, lo: int, hi: int) -> bool:
    """Whether bytes [lo, hi) of a file hold anything but zero padding."""
    fh.seek(lo)
    while lo < hi:
        block = fh.read(min(1 << 20, hi - lo))
        if not block:
            return False
        if block.count(0) != len(block):
            return True
        lo += len(block)
    return False


def _samples(tar: tarfile.TarFile, fh, path: Path) -> Iterator[_Sample]:
    """The samples of an open shard, from its headers alone (data is not read): the same list every time.

    Corrupt headers are skipped by resynchronising on the next valid one (tarfile's ignore_zeros);
    each corrupt stretch, a member cut off by the end of the file and an unreadable tail is reported
    in place as a sample with a problem.
    """
    size = os.fstat(fh.fileno()).st_size
    expected, current, truncated = 0, None, False

    def corrupt(lo: int, hi: int) -> _Sample:
        return _Sample(f"{path.name}@{lo}", {}, ("truncated", f"corrupt tar data at bytes {lo}-{hi} of {path}"))

    while True:
        try:
            member = tar.next()
            error = None
        except tarfile.TarError as e:
            member, error = None, str(e)
        if member is not None and member.offset > expected and _nonzero(fh, expected, member.offset):
            if current:
                yield current
                current = None
            yield corrupt(expected, member.offset)
        if member is None:
            break
        expected = tar.offset
        if not member.isfile():
            continue
        key, suffix = _split_name(member.name)
        if current is None or current.key != key:
            if current:
                yield current
            current = _Sample(key, {})
        current.members[suffix.lower()] = member
        if member.offset_data + member.size > size:
            truncated = True
            have = max(0, size - member.offset_data)
            current.problem = ("truncated", f"{member.name} in {path} ends early ({have} of {member.size} bytes)")
    garbage = not truncated and expected < size and (error is not None or _nonzero(fh, expected, size))
    if current:
        if not truncated and (size - expected < 2 * tarfile.BLOCKSIZE or garbage):
            # no end-of-archive marker: the file was cut off, and the last sample may miss members
            detail = f"{path} ends without tar's end-of-archive marker (cut off); sample {current.key} may be cut"
            current.problem = ("truncated", detail)
        yield current
    if garbage:
        yield corrupt(expected, size)


def _open_tar(fh, path: Path):
    try:
        return tarfile.open(fileobj=fh, mode="r:", ignore_zeros=True)
    except tarfile.TarError as e:
        return e


def count_samples(path: Path) -> int:
    """Samples of one shard (headers only; an unreadable shard is one skipped item)."""
    try:
        with open(path, "rb") as fh:
            tar = _open_tar(fh, path)
            if isinstance(tar, Exception):
                return 1
            with tar:
                return sum(1 for _ in _samples(tar, fh, path))
    except OSError as e:
        raise SourceError(f"cannot read shard {path}: {e}") from None


def _image_suffix(members: dict) -> str | None:
    return next((s for s in members if s.rpartition(".")[2] in IMAGE_SUFFIXES), None)


def read_shard(path: Path, skip: int = 0) -> Iterator[tuple[str, Any, dict]]:
    """(key, image bytes or SkipPayload, metadata) of a shard's samples after the first `skip`."""
    with open(path, "rb") as fh:
        tar = _open_tar(fh, path)
        if isinstance(tar, Exception):
            if skip == 0:
                yield f"{path.name}@0", SkipPayload("truncated", f"{path} is not a readable tar: {tar}"), {}
            return
        with tar, open(path, "rb") as gaps:
            for i, sample in enumerate(_samples(tar, gaps, path)):
                if i >= skip:
                    yield _read_sample(tar, sample)


def _read_sample(tar: tarfile.TarFile, sample: _Sample) -> tuple[str, Any, dict]:
    if sample.problem is not None:
        return sample.key, SkipPayload(*sample.problem), {}
    meta: dict[str, Any] = {}
    try:
        if "json" in sample.members:
            meta = json.loads(tar.extractfile(sample.members["json"]).read())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        if "txt" in sample.members:
            meta["caption"] = tar.extractfile(sample.members["txt"]).read().decode("utf-8", "replace")
        suffix = _image_suffix(sample.members)
        if suffix is None:
            return sample.key, SkipPayload("missing", f"sample {sample.key} has no image member "
                                                      f"({', '.join(sample.members)})"), {}
        return sample.key, tar.extractfile(sample.members[suffix]).read(), meta
    except (tarfile.TarError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return sample.key, SkipPayload("truncated", f"sample {sample.key}: {type(e).__name__}: {e}"), {}


class WebDatasetSource:
    """webdataset tar shards (img2dataset's output): samples in shard order, then member order."""

    kind = "images"

    def __init__(self, spec: str):
        self.spec = spec
        self.shards = shard_paths(spec)
        with ThreadPoolExecutor(min(SCAN_THREADS, len(self.shards))) as pool:
            self.counts = list(pool.map(count_samples, self.shards))
        self.offsets = [0, *accumulate(self.counts)]  # item index of each shard's first sample

    def describe(self) -> dict:
        return {"type": "webdataset", "path": self.spec, "shards": len(self.shards), "samples": len(self)}

    def __len__(self) -> int:
        return self.offsets[-1]

    def iter_items(self, start: int = 0) -> Iterator[Item]:
        index = start
        first = bisect_right(self.offsets, start) - 1
        for s in range(max(first, 0), len(self.shards)):
            skip = max(0, start - self.offsets[s])
            for key, payload, meta in read_shard(self.shards[s], skip):
                yield Item(index=index, id=key, payload=payload, meta=self._meta(meta, s))
                index += 1

    def _meta(self, meta: dict, shard: int) -> dict:
        caption = meta.pop("caption", None)
        out = {"path": None, "caption": None if caption is None else str(caption), "shard": str(self.shards[shard])}
        out.update({k: json_safe(v) for k, v in meta.items() if k not in out})
        return out


# -- parquet ---------------------------------------------------------------------------------------
def parquet_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    return [f.resolve() for f in files]


def image_columns(schema) -> tuple[str | None, str | None]:
    """(column of image bytes, column of image paths) a parquet schema offers, either may be None."""
    import pyarrow as pa

    names = schema.names
    data = next((c for c in BYTES_COLUMNS if c in names and pa.types.is_binary(schema.field(c).type)
                 or c in names and pa.types.is_large_binary(schema.field(c).type)), None)
    path = next((c for c in PATH_COLUMNS if c in names and pa.types.is_string(schema.field(c).type)), None)
    return data, path


class ParquetImageSource:
    """img2dataset's parquet output, or a parquet of image paths, with its other columns as metadata."""

    kind = "images"

    def __init__(self, spec: str):
        self.spec = spec
        self.files = parquet_files(spec)
        if not self.files:
            raise SourceError(f"{spec} holds no .parquet files")
        schema = pq.read_schema(self.files[0])
        self.bytes_column, self.path_column = image_columns(schema)
        if self.bytes_column is None and self.path_column is None:
            raise SourceError(f"{self.files[0]} has neither image bytes ({', '.join(BYTES_COLUMNS)}) nor image "
                              f"paths ({', '.join(PATH_COLUMNS)}); columns: {', '.join(schema.names)}")
        self.key_column = next((c for c in KEY_COLUMNS if c in schema.names), None)
        self.caption_column = next((c for c in ("txt", *CAPTION_COLUMNS) if c in schema.names), None)
        self.row_groups = []  # (file, row group, first item index, rows)
        index = 0
        for f in self.files:
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                self.row_groups.append((f, g, index, meta.row_group(g).num_rows))
                index += meta.row_group(g).num_rows
        self.count = index

    def describe(self) -> dict:
        return {"type": "parquet-images", "path": self.spec, "files": len(self.files), "rows": self.count,
                "image_column": self.bytes_column or self.path_column}

    def __len__(self) -> int:
        return self.count

    def iter_items(self, start: int = 0) -> Iterator[Item]:
        first = bisect_right([g[2] for g in self.row_groups], start) - 1
        for f, g, lo, n in self.row_groups[max(first, 0):]:
            rows = pq.ParquetFile(f).read_row_group(g, use_threads=False).to_pylist()
            for j in range(max(0, start - lo), n):
                yield self._item(lo + j, rows[j], f)

    def _item(self, index: int, row: dict, file: Path) -> Item:
        status = row.get("status")
        path = row.get(self.path_column) if self.path_column else None
        if path is not None and not os.path.isabs(path):
            path = str(file.parent / path)
        payload = row.get(self.bytes_column) if self.bytes_column else None
        if payload is None:
            payload = path
        if status is not None and status != "success":
            payload = SkipPayload("missing", f"img2dataset status {status}: {row.get('error_message') or ''}".strip())
        key = row.get(self.key_column) if self.key_column else None
        ident = str(key) if key is not None else (row.get(self.path_column) if self.path_column else None)
        ident = ident if ident is not None else f"{file.stem}/{index}"
        caption = row.get(self.caption_column) if self.caption_column else None
        meta: dict[str, Any] = {"path": path, "source_row": index,
                                "caption": None if caption is None else str(caption)}
        skip = {self.bytes_column, self.path_column, self.caption_column,
                "caption" if self.caption_column == "txt" else None}  # txt is the caption; caption its copy
        for col, value in row.items():
            if col not in skip and col not in meta:
                meta[col] = json_safe(value)
        if self.caption_column == "txt" and meta["caption"] in (None, "") and row.get("caption"):
            meta["caption"] = str(row["caption"])
        return Item(index=index, id=ident, payload=payload, meta=meta)


def is_image_parquet(path: Path) -> bool:
    """A parquet (file, or the first of a folder's) whose columns are image bytes or paths, not HF features."""
    files = parquet_files(str(path))
    if not files:
        return False
    schema = pq.read_schema(files[0])
    if b"huggingface" in (schema.metadata or {}):  # written by datasets: its features say what is an image
        return False
    data, paths = image_columns(schema)
    return data is not None or paths is not None
