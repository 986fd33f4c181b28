"""FAISS indexes for a segmented database: choose, train, encode per segment, search, tune.

Small databases need no FAISS data: they are searched exactly over their stored vectors. Above
`EXACT_MAX` vectors the default is a rotation, an inverted file and product-quantised codes,
"OPQ{D/8},IVF{~sqrt N},PQ{D/8}np" (96 bytes per 768-d vector: 1 GB of codes at 10M vectors, where SQ4
takes 3.8 GB and SQ8 7.7 GB), trained once on a seeded sample. PQ codes are the cheapest to scan (a
table lookup per byte, ~0.07-0.1 us a code on 2 cores), but plain PQ orders close neighbours loosely:
text-like queries needed 100 candidates per result re-scored. The OPQ rotation, trained first, spreads
the variance evenly over the 96 sub-spaces, so 10-30 candidates per result do (1M: 10, p50 2.4 against
8.0 ms; 10M: 30, README "At scale"), at the cost of a 768x768 matrix per query and ~3 minutes of
training. Every segment holds its share: its vectors encoded with that trained index, labelled with their database rows. At search
time the segments' inverted lists are stacked into one index (faiss `HStackInvertedLists` over
memory-mapped files, nothing copied), removed rows are excluded inside FAISS with an IDSelector,
and the k x `rerank` candidates are re-scored exactly from the stored vectors.

`nprobe` and `rerank` are tuned at build time until recall@10 against exact search reaches
`TARGET_RECALL` on two query sets: image-like queries (database vectors plus noise) and text-like
queries that sit off the image manifold, as CLIP text embeddings do (the modality gap: text-image
cosines are about 0.3; an index tuned on image queries alone can fail text queries,
clip-retrieval #76).

faiss checks inputs with asserts that vanish under `python -O`, and pads missing results with
label -1: every entry point here validates shapes and finiteness itself, and -1 labels never
index anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import faiss
import numpy as np

from ..errors import RDMError

EXACT_MAX = 200_000  # up to this many vectors, exact search over the stored vectors is the default
TARGET_RECALL = 0.95  # recall@10 an approximate index must reach against exact search
TUNE_MARGIN = 0.02  # tuned to TARGET_RECALL + this on the tuning queries, so that fresh queries reach the target
TUNE_QUERIES = 256  # queries per tuning set
RERANKS = (4, 10, 30, 100)  # candidates per result re-scored exactly: codes blur neighbours that are close to
# each other (a dense cluster; PQ96 needs 100, SQ4 4-10), 1000 candidates are ~1.5 MB of scattered float16 reads
CANDIDATE_COST = 100  # a re-scored candidate costs as much as scanning this many codes: ~10-25 when the vectors
# are in the page cache (a ~2.5 us pread and a dot product), far more when read from disk (~80 us)
TRAIN_PER_LIST = 32  # training vectors per inverted list (k-means is told 24 suffice, instead of 39)
TRAIN_MAX = 524_288  # at most this many training vectors (1.6 GB at 768-d): 32 per list at 16384 lists
CODE_TRAIN = 65_536  # vectors the PQ / SQ codes are trained on


@dataclass
class IndexSpec:
    """How a database's FAISS index was built; recorded in the manifest."""

    factory: str  # FAISS factory string ("Flat" = exact search over the stored vectors, "IVF1024,PQ96", ...)
    metric: str = "inner_product"  # vectors are L2-normalised, so this is cosine similarity
    nprobe: int | None = None  # IVF lists visited per query (tuned)
    rerank: int = 1  # candidates fetched per result, re-scored exactly with the stored vectors (tuned)
    recall_at_10: float | None = None  # the lower of the two below
    recall_image: float | None = None  # recall@10 against exact search, image-like queries
    recall_text: float | None = None  # recall@10 against exact search, text-like (off-manifold) queries
    train_size: int | None = None  # vectors the index was trained on
    tag: str | None = None  # digest of the trained index the segments were encoded with

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"


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
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise RDMError(f"{what} contain NaN or Inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                       "refusing to index or search them")
    return x


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def default_factory(n: int, dim: int) -> str:
    """Exact for small databases; above EXACT_MAX an inverted file with ~sqrt(n) lists (a power of two, at
    least 1024) and D/8-byte PQ codes (no polysemous training: it costs minutes and search re-ranks exactly;
    the module docstring says why not SQ4).

    Few, large lists rather than faiss' usual 4-16 sqrt(n): candidates are re-scored exactly from the stored
    vectors, so scanning more codes per list is cheap, while text-like queries, which sit far from every
    centroid, route poorly among many small lists (measured: see README, "At scale"). Assigning a vector
    then costs sqrt(n) dot products (4096 at 10M); an HNSW graph over the centroids only from 16384 lists
    (n ~ 200M) on.
    """
    if n <= EXACT_MAX:
        return "Flat"
    nlist = max(1024, min(2 ** round(math.log2(math.sqrt(n))), 65536))
    quantizer = "_HNSW32" if nlist >= 16384 else ""
    if dim % 8:
        return f"IVF{nlist}{quantizer},SQ8"
    return f"OPQ{dim // 8},IVF{nlist}{quantizer},PQ{dim // 8}np"


def check_factory(factory: str, dim: int) -> faiss.Index | None:
    """An empty index for `factory` (None for Flat); RDMError for strings FAISS or segments can't use."""
    if factory == "Flat":
        return None
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RDMError(f"invalid FAISS factory string '{factory}': {str(e).splitlines()[-1]}") from None
    ivf = ivf_of(index)
    if ivf is None or "fs" in factory.split(",")[-1]:
        raise RDMError(f"index '{factory}' cannot be split into segments: use Flat (exact) or an inverted file "
                       "with array lists, e.g. IVF1024,PQ96, IVF1024,SQ8 or IVF4096_HNSW32,PQ64")
    return index


def ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def coarse_lists(trained: faiss.Index, x: np.ndarray, n: int = 1) -> np.ndarray:
    """(len(x), n) the n nearest inverted lists of each vector under a trained IVF index (its rotation applied)."""
    ivf = ivf_of(trained)
    if ivf is None:
        raise RDMError("coarse_lists needs an inverted-file index")
    x = np.ascontiguousarray(x, np.float32)
    if isinstance(trained, faiss.IndexPreTransform):  # the rotation (OPQ) the lists were trained after
        for i in range(trained.chain.size()):
            x = trained.chain.at(i).apply(x)
    _, lists = ivf.quantizer.search(x, min(n, ivf.nlist))
    return lists


def train(sample: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """Create and train an empty index on a sample (float32 unit vectors).

    A rotation in front of the inverted file ("OPQ96,IVF4096,PQ96np") is trained first, on the codes'
    sample; the lists are then clustered in its space. The coarse centroids come from two-level spherical
    k-means (faiss contrib.clustering, as for billion-scale IVFs): sqrt(nlist) clusters, then each split;
    unit-norm centroids route by cosine (a rotation keeps cosines).
    """
    from faiss.contrib.clustering import two_level_clustering

    index = check_factory(factory, sample.shape[1])
    ivf = ivf_of(index)
    if len(sample) < ivf.nlist:
        raise RDMError(f"index '{factory}' needs at least {ivf.nlist} vectors to train, the database has "
                       f"{len(sample)}: use fewer lists or --index-factory Flat")
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    rng = np.random.default_rng(seed)
    codes_sample = sample if len(sample) <= CODE_TRAIN else sample[np.sort(rng.choice(len(sample), CODE_TRAIN, replace=False))]
    routed = sample
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            step = index.chain.at(i)
            step.train(codes_sample)
            codes_sample, routed = step.apply(codes_sample), step.apply(routed)
    top = max(1, round(math.sqrt(ivf.nlist)))
    centroids = two_level_clustering(routed, top, ivf.nlist, clustering_niter=10, spherical=True, seed=seed,
                                     min_points_per_centroid=24)[0]
    ivf.quantizer.add(normalise(np.ascontiguousarray(centroids, dtype=np.float32)))
    _set_quantizer_ef(ivf, 64)
    ivf.train(codes_sample)  # the quantizer is full: only the codes are trained
    index.is_trained = True  # a rotation's wrapper learns it from its own train(), bypassed here
    return index


def _set_quantizer_ef(ivf, ef: int) -> None:
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = ef


def training_size(factory: str, dim: int) -> int:
    ivf = ivf_of(check_factory(factory, dim))
    return min(TRAIN_MAX, max(TRAIN_PER_LIST * ivf.nlist, 10_000))


def encode(trained: faiss.Index, blocks: np.ndarray | Iterable[np.ndarray], start: int, chunk: int = 65_536) -> bytes:
    """A segment's share: its vectors (an array, or its blocks in order) encoded with the trained index,
    labelled start .. start + n - 1."""
    if isinstance(blocks, np.ndarray):
        array = blocks
        blocks = (array[i:i + chunk] for i in range(0, len(array), chunk))
    index = faiss.clone_index(trained)
    _set_quantizer_ef(ivf_of(index), 16)  # assignment: a near-best list is fine, searches probe several
    row = start
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        index.add_with_ids(block, np.arange(row, row + len(block), dtype=np.int64))
        row += len(block)
    # the share is its inverted file alone, without its copy of the coarse centroids or of a rotation in front
    # (the trained index routes every search): 12.6 MB (+ 2.4 MB) less per segment to read at open at
    # IVF4096 (0.5 GB for 10M vectors)
    ivf = ivf_of(index)
    centroids, empty = ivf.quantizer, faiss.IndexFlatIP(ivf.d)
    ivf.own_fields = False
    ivf.quantizer = empty
    try:
        return serialize(ivf)
    finally:
        ivf.quantizer = centroids
        ivf.own_fields = True


class StackedIndex:
    """The segments' shares as one searchable index: their inverted lists stacked, memory-mapped."""

    def __init__(self, trained: faiss.Index, paths: list[str], ntotal: int):
        self.parts = [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in paths]  # lists mapped, not read
        self.lists = faiss.InvertedListsPtrVector()
        for part in self.parts:
            lists = faiss.downcast_InvertedLists(ivf_of(part).invlists)
            if isinstance(lists, faiss.OnDiskInvertedLists):
                lists.prefetch_nthread = 0  # faiss' default starts 32 threads per search to touch the pages
                # first: 4-5x the time of a 1M search whose pages are in memory anyway
            self.lists.push_back(lists)
        self.stack = faiss.HStackInvertedLists(self.lists.size(), self.lists.data())
        # two views of the same lists: batches parallelise over queries (faiss' default), a single query
        # over the lists it probes (parallel_mode 1), so one query uses every core
        self.index, self.single = faiss.clone_index(trained), faiss.clone_index(trained)
        for index in (self.index, self.single):
            ivf = ivf_of(index)
            ivf.replace_invlists(self.stack, False)
            ivf.ntotal = index.ntotal = ntotal
        ivf_of(self.single).parallel_mode = 1
        self.ivf = ivf_of(self.index)
        self.nlist = self.ivf.nlist

    def search(self, queries: np.ndarray, fetch: int, nprobe: int, selector=None) -> np.ndarray:
        """Candidate rows (Q, fetch), -1 padded."""
        params = faiss.SearchParametersIVF()
        params.nprobe = min(nprobe, self.nlist)
        if selector is not None:
            params.sel = selector
        if isinstance(faiss.downcast_index(self.ivf.quantizer), faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = max(64, 2 * params.nprobe)
            params.quantizer_params = qp
        index = self.single if len(queries) < faiss.omp_get_max_threads() else self.index
        _, labels = index.search(queries, fetch, params=params)
        return labels


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over `vectors` (rows), as (scores, positions)."""
    n = vectors.shape[0]
    k_eff = min(k, n)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    pos = np.full((len(queries), k), -1, np.int64)
    if k_eff == 0:
        return scores, pos
    sims, idx = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), k_eff,
                          metric=faiss.METRIC_INNER_PRODUCT)
    scores[:, :k_eff], pos[:, :k_eff] = sims, idx
    return scores, pos


def merge_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, row) pairs of each query among candidates (Q, M); -inf/-1 padded to k."""
    q, m = scores.shape
    out_s = np.full((q, k), -np.inf, np.float32)
    out_r = np.full((q, k), -1, np.int64)
    if m == 0:
        return out_s, out_r
    order = np.lexsort((rows, -scores), axis=1)[:, :k]  # by score, ties by row: deterministic
    top_s = np.take_along_axis(scores, order, 1)
    top_r = np.take_along_axis(rows, order, 1)
    ok = np.isfinite(top_s) & (top_r >= 0)
    out_s[:, :order.shape[1]] = np.where(ok, top_s, -np.inf)
    out_r[:, :order.shape[1]] = np.where(ok, top_r, -1)
    return out_s, out_r


# -- tuning --------------------------------------------------------------------------------------
def image_like_queries(sample: np.ndarray, seed: int) -> np.ndarray:
    """Queries near, but not on, the data: sampled vectors plus isotropic noise, re-normalised."""
    rng = np.random.default_rng(seed + 1)
    picks = sample[rng.choice(len(sample), min(TUNE_QUERIES, len(sample)), replace=False)]
    noise = rng.standard_normal(picks.shape).astype(np.float32) / math.sqrt(sample.shape[1])
    return normalise(picks + noise)


def text_like_queries(sample: np.ndarray, seed: int, cosine: float = 0.3, gaps: int = 8) -> np.ndarray:
    """Queries off the image manifold, as CLIP text embeddings are (Liang et al. 2022, the modality gap).

    Each is a data vector moved along a "gap" direction (plus a little noise) until its cosine with that
    vector is about `cosine`: the text queries sit in cones of their own, far from every image and from
    the IVF centroids, yet their nearest images are still those of the data vector. A CLIP model has one
    gap direction, unknown when a database is built: the queries spread over `gaps` random directions, so
    a tuning does not depend on how one direction happens to lie to the data.
    """
    rng = np.random.default_rng(seed + 2)
    d = sample.shape[1]
    picks = sample[rng.choice(len(sample), min(TUNE_QUERIES, len(sample)), replace=False)].astype(np.float32)
    gap = normalise(rng.standard_normal((gaps, d)).astype(np.float32))[np.arange(len(picks)) % gaps]
    noise = normalise(rng.standard_normal(picks.shape).astype(np.float32))
    off = normalise(0.85 * gap + 0.15 * noise)
    off = normalise(off - (off * picks).sum(1, keepdims=True) * picks)  # orthogonal to the data vector
    return normalise(cosine * picks + math.sqrt(1 - cosine ** 2) * off)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k rows that the approximate top-k found."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def tune(spec: IndexSpec, nlist: int, search: Callable[[np.ndarray, int, IndexSpec], np.ndarray],
         query_sets: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 10, list_size: float = 1.0) -> None:
    """The cheapest (nprobe, rerank) with recall@k >= TARGET_RECALL (+ margin) on every query set; recorded.

    `search(queries, k, spec)` returns the rows found with the spec's settings; query_sets maps a name
    ("image", "text") to (queries, exact top-k rows). For each re-ranking depth the smallest nprobe that
    reaches the target is found (recall grows with nprobe); of those the one with the least cost,
    nprobe x list_size codes scanned + k x rerank candidates x CANDIDATE_COST, wins.
    """
    nprobes = sorted({min(2 ** i, nlist) for i in range(0, int(math.log2(nlist)) + 2)})
    best: tuple[float, int, int, dict] | None = None
    last: dict[str, float] = {}
    for rerank in sorted(RERANKS, reverse=True):  # the deepest re-ranking reaches the target soonest: its cost
        for nprobe in nprobes:                    # then bounds the search over the others
            cost = nprobe * list_size + k * rerank * CANDIDATE_COST
            if best is not None and cost >= best[0]:
                break  # dearer than the best found, whatever the recall
            spec.nprobe, spec.rerank = nprobe, rerank
            last = {name: recall_at_k(search(q, k, spec), truth) for name, (q, truth) in query_sets.items()}
            if min(last.values()) >= TARGET_RECALL + TUNE_MARGIN:
                best = (cost, nprobe, rerank, last)
                break
    cost, spec.nprobe, spec.rerank, recalls = best if best is not None else (0.0, nlist, RERANKS[-1], last)
    spec.recall_image = round(recalls.get("image", 0.0), 4)
    spec.recall_text = round(recalls.get("text", 0.0), 4)
    spec.recall_at_10 = round(min(recalls.values()), 4)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
