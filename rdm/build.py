"""Building a database: reader -> mapper -> writer, resumable, overlapping decoding with encoding.

  reader   the source's items in order, grouped into batches (ids already in the database are
           dropped when appending);
  decode   worker processes (spawn: faiss and torch threads hang in forked children) turn each
           batch into uint8 pixels with rdm.decode + the embedder's resize/crop, or skip reasons;
           a bounded number of batches is in flight, so decoding overlaps the encoder;
  encode   the main process embeds the good pixels in one batched call;
  writer   every `shard_items` source items become one shard file in NAME/.build/, written
           atomically. A build killed at any moment resumes (`resume=True`) after the last complete
           shard, without re-embedding and without duplicates; the finished database is then
           committed in one step (rdm.store), and the .build folder removed.
(clip-retrieval's reader/mapper/writer split; faiss contrib's write-aside-then-replace.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from . import index as faiss_index
from . import store
from .database import Database, rows_to_table, skipped_table, write_generation
from .decode import DecodeOptions
from .embedder import Embedder
from .errors import DatabaseError, RDMError
from .pixels import PixelTransform, decode_batch, init_worker
from .sources import Item, Source

BUILD_DIR = ".build"
PLAN = "plan.json"
FAULT_ENV = "RDM_FAULT"  # fault injection for tests: "after-shard:N" or "before-commit" -> SIGKILL


@dataclass
class BuildOptions:
    """Settings of one build; those that change the result are recorded in the plan and manifest."""

    batch_size: int = 64  # images per encoder call
    workers: int | None = None  # decoding processes; None = one per core beyond the first (min 1); 0 = inline
    index_factory: str | None = None  # FAISS factory string; None = exact below EXACT_MAX, else tuned IVF
    resume: bool = False  # continue an unfinished build of the same name
    append: bool = False  # add the source's new items to an existing database
    overwrite: bool = False  # replace an existing database (readers keep the old one until the commit)
    limit: int | None = None  # embed at most this many source items
    batches_per_shard: int = 16  # resume granularity: a shard holds this many batches
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

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _fault(point: str) -> None:
    """Kill this process with SIGKILL at a named point when RDM_FAULT asks for it (tests only)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# -- decode stage -------------------------------------------------------------------------------
@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide __main__'s file and spec while spawning, so workers import only rdm.pixels.

    A spawned child re-imports the parent's main module (here the `rdm` script, which imports
    torch, open_clip and faiss: seconds per worker). The workers run functions of rdm.pixels only,
    which needs PIL and numpy; with the main module hidden they start in a fraction of a second.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__dict__.update(__spec__=None)
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _decoded_batches(batches: Iterator[list[Item]], transform: PixelTransform, options: DecodeOptions,
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
            with _main_module_hidden():  # start every worker now, without re-importing __main__
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
                       "spawned workers cannot re-import); finished shards are kept: rerun with --resume, "
                       "or with --workers 0 to decode in-process") from None


# -- shards -------------------------------------------------------------------------------------
def _shard_path(work: Path, n: int) -> Path:
    return work / f"shard-{n:06d}.npz"


def _write_shard(work: Path, n: int, vectors: list, rows: list, skipped: list, end: int) -> None:
    """One shard, atomically: vectors (M, D), metadata rows and skipped items as JSON, next index."""
    tmp = work / f".shard-{n:06d}.tmp.npz"
    vec = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    np.savez(tmp, vectors=vec, rows=np.array(json.dumps(rows)), skipped=np.array(json.dumps(skipped)),
             end=np.array(end))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, _shard_path(work, n))


def _read_shards(work: Path, dim: int) -> tuple[np.ndarray, list, list, int]:
    """All complete shards in order -> (vectors, rows, skipped, next source index)."""
    vectors, rows, skipped, end, n = [], [], [], 0, 0
    while _shard_path(work, n).is_file():
        with np.load(_shard_path(work, n), allow_pickle=False) as z:
            if z["vectors"].size:
                vectors.append(z["vectors"])
            rows += json.loads(str(z["rows"]))
            skipped += json.loads(str(z["skipped"]))
            end = int(z["end"])
        n += 1
    vec = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return vec, rows, skipped, end


def _count_shards(work: Path) -> int:
    n = 0
    while _shard_path(work, n).is_file():
        n += 1
    return n


# -- the build ----------------------------------------------------------------------------------
def _plan(source: Source, embedder: Embedder, opts: BuildOptions, base: str | None) -> dict:
    """What must match for a build to be resumed."""
    return {"source": source.describe(), "embedder": embedder.identity.weights_sha256,
            "batch_size": opts.batch_size, "batches_per_shard": opts.batches_per_shard, "limit": opts.limit,
            "decode": asdict(opts.decode), "append_to": base}


def _prepare(db_dir: Path, name: str, source: Source, embedder: Embedder, opts: BuildOptions):
    """Check the flags against what exists; return (existing db or None, work dir, shards done)."""
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
    if work.is_dir() and opts.resume and (work / PLAN).is_file():
        old = json.loads((work / PLAN).read_text())
        if old != plan:
            diff = sorted(k for k in plan if plan[k] != old.get(k))
            raise DatabaseError(f"the unfinished build of {name} used other settings ({', '.join(diff)}); rerun "
                                "it with the same source and options, or drop --resume to start again")
        return existing, work, _count_shards(work)
    if opts.resume and not (work / PLAN).is_file():
        raise DatabaseError(f"nothing to resume: {name} has no unfinished build"
                            + (" (it is complete; --append adds new items)" if exists else ""))
    if work.is_dir():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / PLAN).write_text(json.dumps(plan, indent=2))
    return existing, work, 0


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def build_database(source: Source, name: str, embedder: Embedder, home: str | Path | None = None,
                   options: BuildOptions | None = None) -> BuildReport:
    """Embed a source into the database `name` (created, resumed, appended to or overwritten)."""
    opts = options or BuildOptions()
    if opts.batch_size < 1:
        raise RDMError("--batch-size must be at least 1")
    db_dir = store.resolve(name, home)
    name = db_dir.name
    started = time.perf_counter()
    with store.writer_lock(db_dir, name):
        existing, work, done_shards = _prepare(db_dir, name, source, embedder, opts)
        shard_items = opts.batch_size * opts.batches_per_shard
        start = done_shards * shard_items
        if done_shards:
            with np.load(_shard_path(work, done_shards - 1), allow_pickle=False) as z:
                start = int(z["end"])
        embedded = _embed_source(source, embedder, opts, work, done_shards, start, shard_items,
                                 set(existing.ids) if existing else set())
        vectors, rows, skipped, _ = _read_shards(work, embedder.dim)
        if source.kind == "embeddings":
            vectors = faiss_index.normalise(faiss_index.check_vectors(vectors, embedder.dim, "source embeddings"))
        if existing is not None:
            if len(rows):
                existing.add(vectors, rows, source.describe(), skipped)
            db = existing
        else:
            db = _write_new(db_dir, name, vectors, rows, skipped, source, embedder, opts)
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    reasons = Counter(s["reason"] for s in skipped)
    return BuildReport(name=name, path=str(db_dir), embedded=embedded, total=db.count, skipped=reasons,
                       skipped_items=skipped, seconds=seconds, index_factory=db.spec.factory,
                       recall_at_10=db.spec.recall_at_10,
                       bytes_on_disk=sum(e["bytes"] for e in db.manifest["files"].values()), resumed_from=start)


def _write_new(db_dir: Path, name: str, vectors, rows, skipped, source: Source, embedder: Embedder,
               opts: BuildOptions) -> Database:
    if len(rows) == 0:
        reasons = Counter(s["reason"] for s in skipped)
        raise RDMError(f"nothing could be embedded from {source.describe().get('path') or source.describe().get('name')}"
                       f" ({len(skipped)} skipped: {', '.join(f'{r} {n}' for r, n in reasons.most_common())}); "
                       "check that the source holds images (jpg, png, webp, bmp, gif, tif)")
    factory = opts.index_factory or faiss_index.default_factory(len(vectors))
    index, spec = faiss_index.build_index(vectors, factory, seed=opts.seed)
    write_generation(db_dir, name, vectors, rows_to_table(rows), skipped_table(skipped), index, spec,
                     embedder.identity, [dict(source.describe(), added=store.now())], fault=_fault)
    return Database.open(db_dir)


def _batches(source: Source, start: int, stop: int | None, batch_size: int) -> Iterator[list[Item]]:
    items = islice(source.iter_items(start), None if stop is None else max(0, stop - start))
    while batch := list(islice(items, batch_size)):
        yield batch


def _embed_source(source: Source, embedder: Embedder, opts: BuildOptions, work: Path, shard: int, start: int,
                  shard_items: int, present: set[str]) -> int:
    """Embed items from `start`, writing a shard every `shard_items` source items; return how many."""
    total = len(source)
    stop = opts.limit if opts.limit is not None else None
    goal = min(total, stop) if total >= 0 and stop is not None else (total if total >= 0 else stop)
    bar = tqdm(total=goal, initial=start, unit="img", desc="embedding", disable=not opts.progress, smoothing=0.1)
    vectors, rows, skipped, in_shard, embedded = [], [], [], 0, 0
    batches = _batches(source, start, stop, opts.batch_size)
    if source.kind == "embeddings":
        decoded = ((b, [None] * len(b)) for b in batches)
    else:
        workers = _default_workers() if opts.workers is None else opts.workers
        decoded = _decoded_batches(batches, embedder.pixel_transform, opts.decode, workers)
    next_index = start
    for batch, results in decoded:
        good, good_items = [], []
        for item, res in zip(batch, results):
            if item.id in present:
                continue
            if source.kind == "embeddings":
                good_items.append((item, None, None))
            elif res[0] is None:
                skipped.append({"id": item.id, "path": item.meta.get("path") or item.id, "reason": res[1],
                                "detail": res[2]})
            else:
                good.append(res[0])
                good_items.append((item, res[1], res[2]))
        if source.kind == "embeddings":
            vecs = [it.embedding for it, _, _ in good_items]
        else:
            vecs = list(embedder.encode_pixels(np.stack(good))) if good else []
            _check_finite(vecs, [it.id for it, _, _ in good_items])
        for (item, w, h), v in zip(good_items, vecs):
            vectors.append(v)
            rows.append({"id": item.id, **item.meta, "width": w, "height": h})
        embedded += len(vecs)
        in_shard += len(batch)
        next_index = batch[-1].index + 1
        bar.update(len(batch))
        bar.set_postfix(skipped=len(skipped), refresh=False)
        if in_shard >= shard_items:
            _write_shard(work, shard, vectors, rows, skipped, next_index)
            _fault(f"after-shard:{shard}")
            shard, vectors, rows, skipped, in_shard = shard + 1, [], [], [], 0
    if in_shard or shard == 0:
        _write_shard(work, shard, vectors, rows, skipped, next_index)
        _fault(f"after-shard:{shard}")
    bar.close()
    return embedded


def _check_finite(vectors: list, ids: list[str]) -> None:
    bad = [i for i, v in zip(ids, vectors) if not np.isfinite(v).all()]
    if bad:
        raise RDMError(f"the embedder produced NaN/Inf vectors for {len(bad)} image(s) (first: {bad[0]}); "
                       "nothing was written for them. Try --dtype float32.")

