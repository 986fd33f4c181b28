"""FAISS indexes for a database: choose, train, tune, search (exact re-ranking from stored vectors).

Small databases get an exact inner-product index ("Flat"). Above `EXACT_MAX` vectors the default is
an inverted file with 8-bit scalar quantisation ("IVF{nlist},SQ8"), trained on a sample, whose
`nprobe` is tuned at build time until recall@10 against exact search reaches `TARGET_RECALL`; the
candidates it returns are re-scored exactly with the stored float32 embeddings. Any FAISS factory
string can be given instead (`--index-factory`), e.g. "HNSW32", "IVF4096,PQ64".

faiss checks inputs with asserts that vanish under `python -O`, and pads missing results with
label -1: every entry point here validates shapes and finiteness itself, and -1 labels never
index anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from .errors import RDMError

EXACT_MAX = 200_000  # up to this many vectors, exact search is the default
TARGET_RECALL = 0.95  # recall@10 an approximate index is tuned to reach against exact search
RERANK_FACTOR = 4  # approximate search fetches k * RERANK_FACTOR candidates, re-scored exactly
TUNE_QUERIES = 256


@dataclass
class IndexSpec:
    """How a database's FAISS index was built; recorded in the manifest."""

    factory: str  # FAISS factory string ("Flat", "IVF1024,SQ8", ...)
    metric: str = "inner_product"  # vectors are L2-normalised, so this is cosine similarity
    nprobe: int | None = None  # IVF lists visited per query (tuned)
    ef_search: int | None = None  # HNSW search breadth (tuned)
    rerank: int = 1  # candidates fetched per result, re-scored exactly with the stored vectors
    recall_at_10: float | None = None  # measured against exact search on held-out queries
    train_size: int | None = None  # vectors the index was trained on

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def check_vectors(x: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return x as C-contiguous float32 (N, dim); raise RDMError on wrong shape, NaN or Inf."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise RDMError(f"{what} have shape {tuple(x.shape)}, expected (N, {dim}): dimension mismatch "
                       "(were they made by another embedder?)")
    if not np.issubdtype(x.dtype, np.floating):
        raise RDMError(f"{what} must be floating point, got {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise RDMError(f"{what} contain NaN or Inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                       "refusing to index or search them")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def default_factory(n: int) -> str:
    """Exact for small databases; IVF with ~sqrt(n) lists and SQ8 codes above EXACT_MAX."""
    if n <= EXACT_MAX:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return f"IVF{max(64, min(nlist, 65536))},SQ8"


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over `vectors` (rows), as (scores, positions)."""
    n = vectors.shape[0]
    k_eff = min(k, n)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    pos = np.full((len(queries), k), -1, np.int64)
    if k_eff == 0:
        return scores, pos
    sims, idx = faiss.knn(queries, vectors, k_eff, metric=faiss.METRIC_INNER_PRODUCT)
    scores[:, :k_eff], pos[:, :k_eff] = sims, idx
    return scores, pos


def build_index(vectors: np.ndarray, factory: str, seed: int = 0) -> tuple[faiss.Index, IndexSpec]:
    """Create, train (on a seeded sample) and fill an index; tune approximate ones to TARGET_RECALL."""
    n, d = vectors.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RDMError(f"invalid FAISS factory string '{factory}': {str(e).splitlines()[-1]}") from None
    spec = IndexSpec(factory=factory)
    if not index.is_trained:
        ivf = _ivf(index)
        want = 64 * ivf.nlist if ivf is not None else 100_000
        if ivf is not None and n < ivf.nlist:
            raise RDMError(f"index '{factory}' needs at least {ivf.nlist} vectors to train, the database has "
                           f"{n}: use fewer lists or --index-factory Flat")
        rng = np.random.default_rng(seed)
        sample = vectors if n <= want else vectors[np.sort(rng.choice(n, want, replace=False))]
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
        spec.train_size = len(sample)
    index.add(vectors)
    if factory != "Flat":
        tune(index, spec, vectors, seed)
    else:
        spec.recall_at_10 = 1.0
    return index, spec


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: faiss.Index):
    idx = faiss.downcast_index(index)
    return idx if hasattr(idx, "hnsw") else None


def _search_params(index: faiss.Index, spec: IndexSpec, selector=None):
    """SearchParameters carrying nprobe / efSearch and an optional id selector."""
    if _ivf(index) is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = spec.nprobe or 1
    elif _hnsw(index) is not None:
        params = faiss.SearchParametersHNSW()
        params.efSearch = spec.ef_search or 16
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def search_index(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, queries: np.ndarray, k: int,
                 allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) through the index, restricted to `allowed` rows, re-ranked exactly."""
    n = index.ntotal
    k_eff = min(k, n if allowed is None else len(allowed))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    if k_eff == 0:
        return scores, rows
    selector = faiss.IDSelectorBatch(allowed.astype(np.int64)) if allowed is not None else None
    fetch = min(k_eff * max(spec.rerank, 1), n)
    _, cand = index.search(queries, fetch, params=_search_params(index, spec, selector))
    # exact scores from the stored float32 vectors: re-ranks quantised candidates, drops -1 padding
    sims = np.where(cand >= 0, np.einsum("qd,qkd->qk", queries, vectors[np.maximum(cand, 0)]), -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k_eff]
    top_rows = np.take_along_axis(cand, order, 1)
    top_scores = np.take_along_axis(sims, order, 1).astype(np.float32)
    rows[:, :k_eff] = np.where(np.isfinite(top_scores), top_rows, -1)
    scores[:, :k_eff] = top_scores
    return scores, rows


def _held_out_queries(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Queries near, but not on, the data: sampled vectors plus isotropic noise, re-normalised."""
    rng = np.random.default_rng(seed + 1)
    picks = vectors[rng.choice(len(vectors), min(TUNE_QUERIES, len(vectors)), replace=False)]
    noise = rng.standard_normal(picks.shape).astype(np.float32) / math.sqrt(vectors.shape[1])
    return normalise(picks + noise)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k rows that the approximate top-k found."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def tune(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, seed: int = 0, k: int = 10) -> None:
    """Raise nprobe / efSearch (and re-ranking) until recall@k >= TARGET_RECALL; record the result."""
    queries = _held_out_queries(vectors, seed)
    _, truth = exact_topk(queries, vectors, k)
    spec.rerank = RERANK_FACTOR
    ivf, hnsw = _ivf(index), _hnsw(index)
    if ivf is not None:
        knob, values = "nprobe", [2 ** i for i in range(0, int(math.log2(ivf.nlist)) + 1)] + [ivf.nlist]
    elif hnsw is not None:
        knob, values = "ef_search", [16, 32, 64, 128, 256, 512, 1024]
    else:
        knob, values = None, [None]
    recall = 0.0
    for value in values:
        if knob:
            setattr(spec, knob, value)
        _, found = search_index(index, spec, vectors, queries, k)
        recall = recall_at_k(found, truth)
        if recall >= TARGET_RECALL:
            break
    spec.recall_at_10 = round(recall, 4)


def reset_and_fill(index: faiss.Index, vectors: np.ndarray) -> None:
    """Replace an index's contents keeping its training (used after removals)."""
    index.reset()
    if len(vectors):
        index.add(vectors)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
