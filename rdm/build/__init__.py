"""Building a database in stages: read -> decode -> embed -> write segments -> index -> commit.

  read     the source's items in a stable order from a start point, in batches (`read_batches`);
           precomputed-vector sources give blocks of vectors instead (`EmbeddingsSource.iter_blocks`)
  decode   worker processes (spawn: faiss and torch threads hang in forked children) turn each
           batch into uint8 pixels with rdm.images.decode + the embedder's resize/crop, or skip records;
           a bounded number of batches is in flight, so decoding overlaps the encoder (`decoded_batches`)
  embed    the main process embeds the good pixels of a batch in one call (`embed_batch`)
  write    every `shard_items` source items become one immutable segment (rdm.db.segment), recorded
           in NAME/.build/progress.json: a build killed at any moment resumes after the last
           finished segment, without re-embedding and without duplicates
  index    approximate databases: the index is trained on a seeded sample of the new vectors
           (or the database's trained index is reused when appending), every segment gets its
           share, and nprobe is tuned on image-like and text-like queries (rdm.db.faiss_index)
  commit   one manifest commit publishes the segments (rdm.db.store); .build is removed.
(clip-retrieval's reader/mapper/writer split; faiss contrib's write-aside-then-replace.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..db import faiss_index, store
from ..db.database import Database
from ..db.manifest import SEGMENT_ROWS, choose_dtype, fault, finish_manifest, new_manifest, rows_to_table, skipped_table
from ..db.segment import npy_layout, read_npy_picks, read_npy_rows, write_segment, write_segment_index
from ..errors import DatabaseError, RDMError, SourceError
from ..images.decode import DecodeOptions
from ..images.pixels import PixelTransform, decode_batch, init_worker
from ..sources import Item, Source
from ..util.files import human_size
from ..util.progress import enabled as progress_bars
from ..util.spawn import main_module_hidden

BUILD_DIR = ".build"
PLAN = "plan.json"


@dataclass
class BuildOptions:
    """Settings of one build; those that change the result are recorded in the plan and manifest."""

    batch_size: int = 64  # images per encoder call
    workers: int | None = None  # decoding processes; None = one per core beyond the first (min 1); 0 = inline
    index_factory: str | None = None  # FAISS factory string; None = exact below EXACT_MAX, else tuned IVF-PQ
    vector_dtype: str | None = None  # stored vectors: float32 or float16; None = float16 above FLOAT16_ABOVE
    resume: bool = False  # continue an unfinished build of the same name (or start one)
    append: bool = False  # add the source's new items to an existing database
    overwrite: bool = False  # replace an existing database (readers keep the old one until the commit)
    limit: int | None = None  # embed at most this many source items
    batches_per_shard: int = 16  # resume granularity: a segment holds this many batches of source items
    seed: int = 0  # index training and tuning
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    progress: bool = True  # show a progress bar


@dataclass
class BuildReport:
    """What a build did, for the summary."""

    name: str
    path: str
    embedded: int  # items embedded by this build
    total: int  # items in the database after it
    skipped: Counter  # reason -> count
    skipped_items: list  # [{"id", "path", "reason", "detail"}]
    seconds: float
    index_factory: str
    recall_at_10: float | None
    bytes_on_disk: int
    resumed_from: int = 0  # source items already done before this run
    segments: int = 0  # segments in the database after it
    note: str | None = None  # e.g. "already complete"

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


# -- read ---------------------------------------------------------------------------------------
def read_batches(source: Source, start: int, stop: int | None, batch_size: int) -> Iterator[list[Item]]:
    """The source's items from index `start` (up to `stop`), in order, as lists of batch_size."""
    items = islice(source.iter_items(start), None if stop is None else max(0, stop - start))
    while batch := list(islice(items, batch_size)):
        yield batch


# -- decode -------------------------------------------------------------------------------------
def decoded_batches(batches: Iterator[list[Item]], transform: PixelTransform, options: DecodeOptions,
                    workers: int) -> Iterator[tuple[list[Item], list]]:
    """Decode batches in worker processes, in order, with a bounded number in flight."""
    if workers == 0:
        for batch in batches:
            yield batch, decode_batch([it.payload for it in batch], transform, options)
        return
    ctx = get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                 initargs=(transform, options)) as pool:
            with main_module_hidden():  # start every worker now, without re-importing __main__
                for f in [pool.submit(os.getpid) for _ in range(workers)]:
                    f.result()
            pending: deque = deque()
            for batch in batches:
                pending.append((batch, pool.submit(decode_batch, [it.payload for it in batch])))
                if len(pending) >= 2 * workers + 1:
                    b, fut = pending.popleft()
                    yield b, fut.result()
            while pending:
                b, fut = pending.popleft()
                yield b, fut.result()
    except BrokenProcessPool:
        raise RDMError("a decoding worker process died (out of memory, or a program run from stdin that "
                       "spawned workers cannot re-import); finished segments are kept: rerun with --resume, "
                       "or with --workers 0 to decode in-process") from None


# -- embed --------------------------------------------------------------------------------------
def embed_batch(embedder, batch: list[Item], results: list, present: set[str]) -> tuple[list, list, list]:
    """One decoded batch -> (vectors, metadata rows, skip records); ids in `present` are dropped."""
    good, items, skipped = [], [], []
    for item, res in zip(batch, results):
        if item.id in present:
            continue
        if res[0] is None:
            skipped.append({"id": item.id, "path": item.meta.get("path") or item.id, "reason": res[1],
                            "detail": res[2]})
        else:
            good.append(res[0])
            items.append((item, res[1], res[2]))
    vectors = list(embedder.encode_pixels(np.stack(good))) if good else []
    bad = [it.id for (it, _, _), v in zip(items, vectors) if not np.isfinite(v).all()]
    if bad:
        raise RDMError(f"the embedder produced NaN/Inf vectors for {len(bad)} image(s) (first: {bad[0]}); "
                       "nothing was written for them. Try --dtype float32.")
    rows = [{"id": item.id, **item.meta, "width": w, "height": h} for item, w, h in items]
    return vectors, rows, skipped


# -- plan and progress ---------------------------------------------------------------------------
def _plan(source: Source, embedder, opts: BuildOptions, base: str | None) -> dict:
    """What must match for a build to be resumed."""
    return {"source": source.describe(), "embedder": embedder.identity.weights_sha256,
            "batch_size": opts.batch_size, "batches_per_shard": opts.batches_per_shard, "limit": opts.limit,
            "decode": asdict(opts.decode), "append_to": base, "index_factory": opts.index_factory,
            "vector_dtype": opts.vector_dtype}


class Progress:
    """NAME/.build/progress.json: the finished segments of an unfinished build and where to go on."""

    def __init__(self, work: Path, state: dict | None = None):
        self.work = work
        self.state = state or {"segments": [], "files": [], "next_index": 0, "next_row": None,
                               "embedded": 0, "trained": None}
        # "pending": {shard: segment entry} a parallel engine (rdm.build.ray_data) finished ahead of the
        # ordered "segments"; kept (and reused on resume) until the shards before them are done

    @classmethod
    def load(cls, work: Path) -> "Progress":
        path = work / store.PROGRESS
        return cls(work, json.loads(path.read_text()) if path.is_file() else None)

    def save(self) -> None:
        s = self.state
        segments = s["segments"] + list(s.get("pending", {}).values())
        s["files"] = sorted({e["name"] for seg in segments for e in seg["files"].values()}
                            | ({s["trained"]["name"]} if s.get("trained") else set()))
        store.atomic_write_json(self.work / store.PROGRESS, s)


def _prepare(db_dir: Path, name: str, source: Source, embedder, opts: BuildOptions):
    """Check the flags against what exists; return (existing db or None, Progress) or (db, None) if complete."""
    exists = (db_dir / store.MANIFEST).is_file()
    work = db_dir / BUILD_DIR
    if opts.append and opts.overwrite:
        raise RDMError("--append and --overwrite exclude each other")
    if exists and not (opts.append or opts.overwrite or opts.resume):
        raise DatabaseError(f"database {name} already exists ({db_dir}); use --append to add items, or "
                            "--overwrite to rebuild it")
    existing = Database.open(db_dir) if exists and opts.append else None
    if existing is not None and not existing.identity.same_vectors_as(embedder.identity):
        raise DatabaseError(f"cannot append to {name}: it was built with {existing.identity.describe()}, "
                            f"not {embedder.identity.describe()}")
    plan = _plan(source, embedder, opts, existing.fingerprint if existing else None)
    if opts.resume and work.is_dir() and (work / PLAN).is_file():
        old = json.loads((work / PLAN).read_text())
        if old != plan:
            diff = sorted(k for k in plan if plan[k] != old.get(k))
            raise DatabaseError(f"the unfinished build of {name} used other settings ({', '.join(diff)}); rerun "
                                "it with the same source and options, or drop --resume to start again")
        progress = Progress.load(work)
        for seg in progress.state["segments"]:
            for e in seg["files"].values():
                if not (db_dir / e["name"]).is_file():
                    raise DatabaseError(f"the unfinished build of {name} lost its segment {seg['id']}; rerun "
                                        "without --resume to start again")
        return existing, progress
    if opts.resume and exists and not opts.append:
        return Database.open(db_dir), None  # nothing unfinished: the database is complete
    if work.is_dir():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store.atomic_write_json(work / PLAN, plan)
    progress = Progress(work)
    progress.save()
    return existing, progress


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# -- the build ----------------------------------------------------------------------------------
def build_database(source: Source, name: str, embedder, home: str | Path | None = None,
                   options: BuildOptions | None = None, engine=None) -> BuildReport:
    """Embed a source into the database `name` (created, resumed, appended to or overwritten).

    `engine` runs read -> decode -> embed -> write from where the progress stands, with the signature
    of `embed_into_segments` (this process and its decoding workers, the default) or
    `rdm.build.ray_data.RayEngine` (a Ray Data pipeline); the driver's plan, index and commit are the same.
    """
    opts = options or BuildOptions()
    if opts.batch_size < 1:
        raise RDMError("--batch-size must be at least 1")
    db_dir = store.resolve(name, home)
    name = db_dir.name
    started = time.perf_counter()
    with store.writer_lock(db_dir, name):
        existing, progress = _prepare(db_dir, name, source, embedder, opts)
        if progress is None:
            return _report(existing, 0, [], started, 0, note=f"database {name} is complete; nothing to resume "
                                                                "(--append adds a source's new items)")
        state = progress.state
        if state["next_row"] is None:
            state["next_row"] = existing.total_rows if existing else 0
        resumed_from = state["next_index"]
        expected = (existing.count if existing else 0) + _expected_items(source, opts)
        dtype = existing.manifest.get("vector_dtype", "float32") if existing else choose_dtype(expected, opts.vector_dtype)
        present = set()
        if existing is not None:
            present = set(existing.rows_of(_source_ids(source, opts)))
        (engine or embed_into_segments)(source, embedder, opts, db_dir, progress, present, dtype)
        skipped = [r for seg in state["segments"] for r in _segment_skipped(db_dir, name, seg)]
        if existing is None and sum(s["rows"] for s in state["segments"]) == 0:
            reasons = Counter(s["reason"] for s in skipped)
            desc = source.describe()
            raise RDMError(f"nothing could be embedded from {desc.get('path') or desc.get('name')} "
                           f"({len(skipped)} skipped: {', '.join(f'{r} {n}' for r, n in reasons.most_common())}); "
                           "check that the source holds images (jpg, png, webp, bmp, gif, tif)")
        manifest = _index_and_manifest(db_dir, name, source, embedder, opts, existing, progress, dtype)
        fault("before-commit")
        store.commit(db_dir, manifest, fault=fault)
        shutil.rmtree(db_dir / BUILD_DIR, ignore_errors=True)
        db = Database.open(db_dir, verify=False)
    return _report(db, state["embedded"], skipped, started, resumed_from)


def _report(db: Database, embedded: int, skipped: list, started: float, resumed_from: int,
            note: str | None = None) -> BuildReport:
    items = skipped if note is None else []
    return BuildReport(name=db.name, path=str(db.path), embedded=embedded, total=db.count,
                       skipped=Counter(s["reason"] for s in items), skipped_items=items,
                       seconds=time.perf_counter() - started, index_factory=db.spec.factory,
                       recall_at_10=db.spec.recall_at_10,
                       bytes_on_disk=store.manifest_info(db.path, db.manifest)["bytes_on_disk"], resumed_from=resumed_from,
                       segments=len(db.segments), note=note)


def _expected_items(source: Source, opts: BuildOptions) -> int:
    n = len(source)
    return n if opts.limit is None else min(n, opts.limit)


def _source_ids(source: Source, opts: BuildOptions) -> list[str]:
    """Ids of the source's items (for appending: which are new)."""
    if source.kind == "embeddings":
        return [i for _, _, ids, _ in source.iter_blocks(0) for i in ids][:opts.limit]
    return [it.id for it in islice(source.iter_items(0), opts.limit)]


def _segment_skipped(db_dir: Path, name: str, seg: dict) -> list[dict]:
    from ..db.segment import Segment

    s = Segment(db_dir, name, seg, verify=False)
    try:
        return s.skipped().to_pylist()
    finally:
        s.close()


def embed_into_segments(source: Source, embedder, opts: BuildOptions, db_dir: Path, progress: Progress,
                        present: set[str], dtype: str) -> None:
    """Read, decode and embed from where the progress stands, writing a segment per shard of source items."""
    state = progress.state
    start, stop = state["next_index"], opts.limit
    total = _expected_items(source, opts)
    bar = tqdm(total=total, initial=start, unit="img", desc="embedding",
               disable=not progress_bars(opts.progress), smoothing=0.1)

    def flush(vectors: np.ndarray, table, skipped, next_index):
        entry = write_segment(db_dir, state["next_row"], vectors, table, skipped_table(skipped), dtype)
        state["segments"].append(entry)
        state["next_row"] += len(vectors)
        state["next_index"] = next_index
        state["embedded"] += len(vectors)
        progress.save()
        fault(f"after-shard:{len(state['segments']) - 1}")

    if source.kind == "embeddings":
        _copy_vectors(source, embedder.dim, start, stop, present, dtype, flush, bar, lambda: bool(state["segments"]))
        bar.close()
        return
    shard_items = opts.batch_size * opts.batches_per_shard
    workers = _default_workers() if opts.workers is None else opts.workers
    batches = read_batches(source, start, stop, opts.batch_size)
    vectors, rows, skipped, in_shard, next_index = [], [], [], 0, start
    for batch, results in decoded_batches(batches, embedder.pixel_transform, opts.decode, workers):
        v, r, s = embed_batch(embedder, batch, results, present)
        vectors += v
        rows += r
        skipped += s
        in_shard += len(batch)
        next_index = batch[-1].index + 1
        bar.update(len(batch))
        bar.set_postfix(skipped=len(skipped), refresh=False)
        if in_shard >= shard_items:
            flush(_stack(vectors, embedder.dim), rows_to_table(rows), skipped, next_index)
            vectors, rows, skipped, in_shard = [], [], [], 0
    if in_shard or not state["segments"]:
        flush(_stack(vectors, embedder.dim), rows_to_table(rows), skipped, next_index)
    bar.close()


def _stack(vectors: list, dim: int) -> np.ndarray:
    return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)


def _copy_vectors(source, dim: int, start: int, stop: int | None, present: set[str], dtype: str, flush, bar,
                  written) -> None:
    """Precomputed vectors -> segments of SEGMENT_ROWS, block by block into one buffer (bounded memory)."""
    buf = np.empty((SEGMENT_ROWS, dim), dtype)
    last = start
    ids: list[str] = []
    meta: list[dict] = []
    n = 0
    for lo, block, block_ids, block_meta in source.iter_blocks(start, 16_384):
        if stop is not None and lo >= stop:
            break
        hi = len(block_ids) if stop is None else min(len(block_ids), stop - lo)
        block = faiss_index.normalise(faiss_index.check_vectors(block[:hi], dim, "source embeddings"))
        keep = np.array([i not in present for i in block_ids[:hi]], bool) if present else np.ones(hi, bool)
        where = np.nonzero(keep)[0]
        done = 0
        while done < len(where):
            take = where[done:done + SEGMENT_ROWS - n]
            buf[n:n + len(take)] = block[take]
            ids += [block_ids[j] for j in take]
            meta += [block_meta[j] for j in take]
            n += len(take)
            done += len(take)
            if n == SEGMENT_ROWS:
                flush(buf, _vector_table(ids, meta), [], lo + int(take[-1]) + 1)
                ids, meta, n = [], [], 0
        bar.update(hi)
        last = lo + hi
    if n or not written():
        flush(buf[:n], _vector_table(ids, meta), [], last)


def _vector_table(ids: list[str], meta: list[dict]):
    """Metadata of precomputed vectors: ids (and the source's columns, when it has any)."""
    import pyarrow as pa

    if any(set(m) - {"path", "caption"} or m.get("caption") for m in meta):
        return rows_to_table([{"id": i, **m} for i, m in zip(ids, meta)])
    empty = rows_to_table([])
    cols = {c: pa.nulls(len(ids), empty.schema.field(c).type) for c in empty.column_names}
    cols["id"] = pa.array(ids, pa.string())
    return pa.table(cols, schema=empty.schema)


def _index_and_manifest(db_dir: Path, name: str, source: Source, embedder, opts: BuildOptions,
                        existing: Database | None, progress: Progress, dtype: str) -> dict:
    """Give every new segment its share of the index (training one if needed); the manifest to commit."""
    state = progress.state
    new = state["segments"]
    source_entry = dict(source.describe(), added=store.now())
    if existing is not None:
        m = dict(existing.manifest)
        trained = existing._trained_index()
        if trained is not None:
            new = [s if "index" in s["files"] else write_segment_index(
                db_dir, s, faiss_index.encode(trained, _segment_blocks(db_dir, s), s["start"]), existing.spec.tag)
                for s in new]
        m["segments"] = m["segments"] + [s for s in new if s["rows"] or s["skipped"]]
        m["sources"] = m.get("sources", []) + [source_entry]
        return finish_manifest(m, len(existing.tombstones))
    total = sum(s["rows"] for s in new)
    spec = faiss_index.IndexSpec(factory=opts.index_factory or faiss_index.default_factory(total, embedder.dim))
    m = new_manifest(name, embedder.identity, spec, dtype, [source_entry])
    m["segments"] = new
    if spec.exact:
        spec.recall_at_10 = spec.recall_image = spec.recall_text = 1.0
        m["index"] = spec.to_dict()
        return finish_manifest(m)
    # approximate: train on a seeded sample of the vectors, encode every segment, tune on both query sets
    if state.get("trained") is None:
        sample = _sample(db_dir, name, new, faiss_index.training_size(spec.factory, embedder.dim), opts.seed)
        trained = faiss_index.train(sample, spec.factory, seed=opts.seed)
        train_size = len(sample)
        del sample  # 1.6 GB at 10M x 768: not kept while the segments are encoded
        data = faiss_index.serialize(trained)
        written = store.atomic_write(db_dir / ".trained.tmp", data)
        tag = written[store.HASH][:16]
        path = db_dir / f"trained.{tag}.faiss"
        os.replace(db_dir / ".trained.tmp", path)
        state["trained"] = dict(store.file_entry(db_dir, path, written), tag=tag, train_size=train_size)
        progress.save()
    entry = state["trained"]
    trained = faiss_index.deserialize((db_dir / entry["name"]).read_bytes())
    spec.tag, spec.train_size = entry["tag"], entry["train_size"]
    for i, s in enumerate(new):
        if "index" not in s["files"]:
            new[i] = write_segment_index(db_dir, s, faiss_index.encode(trained, _segment_blocks(db_dir, s), s["start"]), spec.tag)
            progress.save()
    m["segments"] = new
    m["trained"] = {k: entry[k] for k in ("name", "bytes", store.HASH)}
    m["index"] = spec.to_dict()
    m = finish_manifest(m)
    db = Database(db_dir, m, verify=False)  # not yet committed: tuned first
    _tune(db, spec, opts.seed)
    m["index"] = spec.to_dict()
    return m


def _segment_blocks(db_dir: Path, seg: dict, rows: int = 65_536) -> Iterator[np.ndarray]:
    """A segment's vectors, read block by block (nothing mapped, one block in memory)."""
    path = db_dir / seg["files"]["vectors"]["name"]
    for lo in range(0, seg["rows"], rows):
        yield read_npy_rows(path, lo, lo + rows)


def _sample(db_dir: Path, name: str, segments: list[dict], n: int, seed: int) -> np.ndarray:
    """A seeded random sample of n vectors across segments (float32), read chunk by chunk."""
    total = sum(s["rows"] for s in segments)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, min(n, total), replace=False))
    dim = npy_layout(db_dir / segments[0]["files"]["vectors"]["name"])[1][1]
    out = np.empty((len(picks), dim), np.float32)  # filled in place: no second copy of a 1.6 GB sample
    offset, filled = 0, 0
    for s in segments:
        local = picks[(picks >= offset) & (picks < offset + s["rows"])] - offset
        if len(local):
            out[filled:filled + len(local)] = read_npy_picks(db_dir / s["files"]["vectors"]["name"], local)
            filled += len(local)
        offset += s["rows"]
    return out


def _tune(db: Database, spec: faiss_index.IndexSpec, seed: int) -> None:
    """Tune nprobe and re-ranking on image-like and text-like queries against exact search."""
    base = _sample(db.path, db.name, db.manifest["segments"], 4 * faiss_index.TUNE_QUERIES, seed + 11)
    sets = {}
    for kind, make in (("image", faiss_index.image_like_queries), ("text", faiss_index.text_like_queries)):
        q = make(base, seed)
        sets[kind] = (q, db._exact_search(q, 10, None)[1])
    nlist = db.stacked_index().nlist
    faiss_index.tune(spec, nlist, lambda q, k, sp: db._index_search(q, k, None, sp)[1], sets,
                     list_size=db.count / nlist)


def default_name(source: str) -> str:
    """Database name from a source spec: folder or file name, or the dataset's name."""
    name = Path(source.removeprefix("hf:").rstrip("/")).name
    return Path(name).stem if Path(name).suffix in (".npy", ".npz", ".parquet") else name


def build_index(source: str, name: str | None = None, clip: str | None = None, indexes: str | None = None,
                batch_size: int = BuildOptions.batch_size, workers: int | None = None, device: str | None = None,
                dtype: str = "auto",
                index_factory: str | None = None, vector_dtype: str | None = None, resume: bool = False,
                append: bool = False, overwrite: bool = False, limit: int | None = None, checkpoint_every: int = BuildOptions.batches_per_shard,
                split: str = "train", image_column: str | None = None, caption_column: str | None = None,
                streaming: bool = False, progress: bool = True, engine: str = "local",
                ray_address: str | None = None) -> "BuildReport":
    """`rdm build-index`: open the source, load the embedder, build (or resume/append) the database.

    engine "local" runs the stages in this process and its decoding workers; "ray" runs them as a
    Ray Data pipeline on the cluster at `ray_address` (default: a local one), see rdm.build.ray_data.
    """
    from ..embed.identity import DEFAULT_CLIP, local_dir_canonical
    from ..sources import open_source

    if engine not in ("local", "ray"):
        raise RDMError(f"--engine must be local or ray, not {engine}")
    if ray_address and engine != "ray":
        raise RDMError("--ray-address needs --engine ray")
    src = open_source(source, split=split, image_column=image_column, caption_column=caption_column,
                      streaming=streaming)
    if len(src) == 0:
        raise SourceError(f"source {source} holds no images (looked for jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
    name = name or default_name(source)
    db_dir = store.resolve(name, indexes)
    recorded = None
    if (append or resume) and (db_dir / store.MANIFEST).is_file():
        recorded = store.read_manifest(db_dir, db_dir.name)["embedder"]
        if clip is None:  # keep the embedder the database was built with (the manifest says which)
            clip = recorded["model"]
        elif local_dir_canonical(clip) != local_dir_canonical(recorded["model"]):
            recorded = None
    if src.kind == "embeddings":  # nothing to embed, and this process never imports torch: vectors added to a
        # database with its CLIP (no --clip, or the same id) are recorded as its manifest says; otherwise
        # the CLIP's identity is computed in a child process (loaded only if it is on this machine)
        from ..embed import identity_for_vectors
        from ..embed.identity import EmbedderIdentity, IdentityOnly

        if recorded is not None:
            embedder = IdentityOnly(EmbedderIdentity.from_dict(recorded))
        else:
            embedder = identity_for_vectors(clip or DEFAULT_CLIP, int(src.vectors.shape[1]))
    else:
        from ..embed import load_embedder

        embedder = load_embedder(clip or DEFAULT_CLIP, device, dtype)
    opts = BuildOptions(batch_size=batch_size, workers=workers, index_factory=index_factory,
                        vector_dtype=vector_dtype, resume=resume, append=append, overwrite=overwrite, limit=limit,
                        progress=progress, batches_per_shard=checkpoint_every)
    runner = None
    if engine == "ray":
        from .ray_data import RayEngine

        runner = RayEngine(address=ray_address, dtype=None if dtype == "auto" else dtype)
    return build_database(src, name, embedder, indexes, opts, engine=runner)


def format_report(r: BuildReport) -> str:
    """The summary printed at the end of a build."""
    from ..images.decode import SKIP_REASONS

    if r.note:
        return f"{r.note}\n  total      {r.total} items"
    lines = [f"database {r.name}  ({r.path})",
             f"  embedded   {r.embedded} items in {r.seconds:.1f} s ({r.images_per_second:.1f} images/s)"
             + (f", resumed after {r.resumed_from} source items" if r.resumed_from else ""),
             f"  total      {r.total} items in {r.segments} segment(s)",
             f"  skipped    {sum(r.skipped.values())}"
             + (" (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(r.skipped.items())) + ")" if r.skipped else ""),
             f"  index      {r.index_factory}" + (f", recall@10 {r.recall_at_10:.3f}" if r.recall_at_10 is not None else ""),
             f"  on disk    {human_size(r.bytes_on_disk)}"]
    for reason in sorted(r.skipped):
        lines.append(f"    {reason}: {SKIP_REASONS.get(reason, '')}")
    for s in r.skipped_items[:20]:
        lines.append(f"    skipped {s['path']}: {s['reason']}")
    if len(r.skipped_items) > 20:
        lines.append(f"    ... and {len(r.skipped_items) - 20} more (rdm info {r.name} --json lists them all)")
    return "\n".join(lines)


