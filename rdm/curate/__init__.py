"""`rdm curate`: near-duplicates, outliers and representatives of a collection, from its stored vectors.

- Neighbours: every live item's k nearest items, searched with the database's own index in batches (no N x N
  matrix, memory bounded by the batch).
- Near-duplicates: pairs at cosine >= `dup_threshold` (0.96, fastdup's default) joined into groups; each group
  keeps its first item (lowest row: the order the collection was built in) and flags the others.
- Outliers: two distances per item, each turned into a robust z-score (minus the median, over 1.4826 x MAD): its
  mean cosine distance to its k nearest other items (duplicates of it left out: a different kind of image sits
  far from everything) and its Mahalanobis distance from the collection under a Ledoit-Wolf shrunk covariance (an
  item of another style sits off the directions the collection varies along, even when items of its content are
  near; the plain distance to the centroid missed most such items on toy art); the score is the larger, flagged
  above `mad_factor` (3), stated in the report; `outlier_threshold` sets it instead.
- Representatives: `n_representatives` items chosen by greedy k-center (farthest point first, from the item
  nearest the centroid) among the items that stay (outliers and dropped copies left out): the collection's
  "style card".
- Coherence: the mean similarity of items to their k nearest neighbours, and of items to the collection's
  centroid; comparable across collections embedded with one CLIP.

Acting on it (`apply`) removes flagged items through Database.remove (tombstones, one commit), with the reason
recorded in the manifest's history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import RDMError

KINDS = ("duplicates", "outliers")


@dataclass(frozen=True)
class CurateOptions:
    """How to curate (every default stated in the report)."""

    k: int = 10  # neighbours per item for the outlier score and the coherence
    dup_threshold: float = 0.96  # cosine at or above which two items are near-duplicates
    mad_factor: float = 3.0  # outliers: a robust z-score above this (see the module's docstring)
    outlier_threshold: float | None = None  # or this score
    n_representatives: int = 16  # the style card's size
    where: tuple[str, ...] = ()  # COLUMN=VALUE: curate only these items
    batch_size: int = 1024  # items searched per index call (an exact search holds batch x N scores)

    def __post_init__(self):
        if self.k < 1:
            raise RDMError(f"curate needs k >= 1 neighbours, got {self.k}")
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise RDMError(f"the duplicate threshold is a cosine in [-1, 1], got {self.dup_threshold}")
        if self.mad_factor <= 0:
            raise RDMError(f"the outlier MAD factor must be > 0, got {self.mad_factor}")
        if self.n_representatives < 0:
            raise RDMError(f"n_representatives must be >= 0, got {self.n_representatives}")


@dataclass
class CurateReport:
    """What `curate` found; every id is an item id of the database."""

    database: str
    count: int  # items curated
    options: dict
    duplicate_groups: list[dict] = field(default_factory=list)  # {"keep", "drop": [...], "pairs": [[a, b, cos]]}
    outliers: list[dict] = field(default_factory=list)  # {"id", "score", "nearest": [ids]} ranked, worst first
    outlier_threshold: float = 0.0
    outlier_rule: str = ""
    representatives: list[str] = field(default_factory=list)
    coherence: dict = field(default_factory=dict)  # {"knn_similarity", "centroid_similarity"}
    scores: dict = field(default_factory=dict)  # id -> outlier score (every item)

    def flagged(self, kinds: Sequence[str] = KINDS) -> dict[str, str]:
        """{id: reason} of the items `apply` would remove for these kinds."""
        out: dict[str, str] = {}
        if "duplicates" in kinds:
            for g in self.duplicate_groups:
                for item in g["drop"]:
                    out[item] = f"near-duplicate of {g['keep']}"
        if "outliers" in kinds:
            for o in self.outliers:
                out.setdefault(o["id"], f"outlier (score {o['score']:.3f} > {self.outlier_threshold:.3f})")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def parse_kinds(text: str | Sequence[str]) -> tuple[str, ...]:
    parts = [p.strip() for part in ([text] if isinstance(text, str) else text) for p in part.split(",") if p.strip()]
    bad = [p for p in parts if p not in KINDS]
    if bad or not parts:
        raise RDMError(f"--apply takes {', '.join(KINDS)} (comma-separated), got {', '.join(parts) or 'nothing'}")
    return tuple(dict.fromkeys(parts))


def _union_find(n: int):
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the lower position (the earlier row) stays the root
    return find, union


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 x MAD): how many robust standard deviations above the typical value."""
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median))) * 1.4826
    return (x - median) / max(mad, 1e-6)


def mahalanobis(vectors: np.ndarray, batch: int = 65_536) -> np.ndarray:
    """Each item's Mahalanobis distance from the collection, under the Ledoit-Wolf shrunk covariance (Ledoit & Wolf
    2004: the sample covariance pulled towards a scaled identity by the amount that minimises the expected error,
    so that it stays invertible with fewer items than dimensions). Batched: memory is D x D plus one batch."""
    n, d = vectors.shape
    mean = vectors.mean(0, dtype=np.float64)
    cov = np.zeros((d, d))
    fourth = 0.0  # sum of |x_i|^4, for the shrinkage
    for lo in range(0, n, batch):
        x = vectors[lo:lo + batch].astype(np.float64) - mean
        cov += x.T @ x
        fourth += float(np.sum(np.sum(x * x, 1) ** 2))
    cov /= n
    mu = np.trace(cov) / d
    delta = float(np.sum((cov - mu * np.eye(d)) ** 2)) / d
    beta = min(delta, (fourth - n * float(np.sum(cov * cov))) / d / n ** 2)
    shrink = beta / delta if delta > 0 else 1.0
    precision = np.linalg.inv((1 - shrink) * cov + shrink * mu * np.eye(d) + 1e-12 * np.eye(d))
    out = np.empty(n, np.float32)
    for lo in range(0, n, batch):
        x = vectors[lo:lo + batch].astype(np.float64) - mean
        out[lo:lo + batch] = np.sqrt(np.maximum(np.sum((x @ precision) * x, 1), 0))
    return out


def k_center(vectors: np.ndarray, n: int) -> list[int]:
    """Greedy k-center: the item nearest the centroid, then repeatedly the item farthest from those chosen."""
    if n <= 0 or len(vectors) == 0:
        return []
    centroid = vectors.mean(0)
    chosen = [int(np.argmax(vectors @ centroid))]
    nearest = vectors @ vectors[chosen[0]]  # similarity to the closest chosen item
    for _ in range(min(n, len(vectors)) - 1):
        nxt = int(np.argmin(nearest))
        chosen.append(nxt)
        nearest = np.maximum(nearest, vectors @ vectors[nxt])
    return chosen


LISTS_PER_ITEM = 4  # partitioned collections: each item looks for its neighbours in its 4 nearest lists
PARTITION_ABOVE = 20_000  # exact databases with more items are partitioned by k-means (an N x N search is slow)


def kmeans_lists(vectors: np.ndarray, probe: int, seed: int = 0) -> np.ndarray:
    """(n, probe) each vector's nearest lists of a spherical k-means of ~sqrt(n) centroids trained on a seeded
    sample (faiss), for collections searched exactly, which have no inverted lists of their own."""
    import faiss

    n, d = vectors.shape
    nlist = max(2, int(round(np.sqrt(n))))
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    kmeans = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    _, lists = kmeans.index.search(np.ascontiguousarray(vectors, np.float32), min(probe, nlist))
    return lists


def _neighbours_by_search(database, rows, vectors, k, where, batch_size, progress):
    """Each item's k + 1 nearest (itself too) by the database's own search: (positions in `rows`, similarities)."""
    n = len(rows)
    nb_pos = np.full((n, k + 1), -1, np.int64)
    nb_sim = np.full((n, k + 1), -np.inf, np.float32)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        result = database.search(vectors[lo:hi], k=k + 1, where=where, records=False)
        pos = np.clip(np.searchsorted(rows, result.rows), 0, n - 1)  # rows are sorted
        nb_pos[lo:hi] = np.where((result.rows >= 0) & (rows[pos] == result.rows), pos, -1)
        nb_sim[lo:hi] = result.scores
        if progress is not None:
            progress(hi, n)
    return nb_pos, nb_sim


def _neighbours_by_list(vectors, lists, k, progress):
    """Each item's k + 1 nearest among the items of its nearest inverted lists, exactly (the way SemDeDup and
    clustered k-NN graphs work: the index's k-means partition keeps every product small; items of a list are
    compared with the items whose nearest list it is). (positions, similarities), best first."""
    n = len(vectors)
    home = lists[:, 0]
    order = np.argsort(home, kind="stable")
    starts = np.searchsorted(home[order], np.arange(int(home.max()) + 2))
    nb_pos = np.full((n, k + 1), -1, np.int64)
    nb_sim = np.full((n, k + 1), -np.inf, np.float32)
    done = 0
    for probe in range(lists.shape[1]):
        asked = lists[:, probe]
        q_order = np.argsort(asked, kind="stable")
        q_starts = np.searchsorted(asked[q_order], np.arange(int(home.max()) + 2))
        for lst in range(len(starts) - 1):
            members = order[starts[lst]:starts[lst + 1]]
            queries = q_order[q_starts[lst]:q_starts[lst + 1]] if lst + 1 < len(q_starts) else q_order[:0]
            if len(members) == 0 or len(queries) == 0:
                continue
            sims = vectors[queries] @ vectors[members].T  # (q, m)
            take = min(k + 1, len(members))
            top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            top_sim = np.take_along_axis(sims, top, 1)
            cand_pos = np.concatenate([nb_pos[queries], members[top]], 1)
            cand_sim = np.concatenate([nb_sim[queries], top_sim], 1)
            best = np.argsort(-cand_sim, axis=1, kind="stable")[:, :k + 1]
            nb_pos[queries] = np.take_along_axis(cand_pos, best, 1)
            nb_sim[queries] = np.take_along_axis(cand_sim, best, 1)
            done += len(queries)
            if progress is not None:
                progress(min(n, done // lists.shape[1]), n)
    return nb_pos, nb_sim


def curate(database, options: CurateOptions = CurateOptions(),
           progress: Callable[[int, int], None] | None = None) -> CurateReport:
    """Curate a Database (or a name: see rdm.api.curate) from its stored vectors."""
    from ..db.database import parse_where

    where = parse_where(list(options.where)) if options.where else None
    rows = database.filter_rows(where) if where else database.live_rows()
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if n < 2:
        raise RDMError(f"database {database.name} has {n} item(s){' matching ' + str(where) if where else ''}; "
                       "curation needs at least 2")
    k = min(options.k, n - 1)
    vectors = database.vectors_at(rows)  # (n, D) unit vectors; float32 of a 1M x 768 collection: ~3 GB
    lists = database.coarse_lists(vectors, LISTS_PER_ITEM)
    if lists is None and n > PARTITION_ABOVE:  # a large exact database: a k-means partition of its own
        lists = kmeans_lists(vectors, LISTS_PER_ITEM)
    if lists is None:  # a small exact database: its own search, batch by batch
        nb_pos, nb_sim = _neighbours_by_search(database, rows, vectors, k, where, options.batch_size, progress)
    else:  # an inverted file: exact neighbours among the items of the same lists
        nb_pos, nb_sim = _neighbours_by_list(vectors, lists, k, progress)
    others = (nb_pos >= 0) & (nb_pos != np.arange(n)[:, None])  # a neighbour that is not the item itself

    # near-duplicates: pairs above the threshold, grouped (the lowest row of a group is kept)
    find, union = _union_find(n)
    dup = others & (nb_sim >= options.dup_threshold)
    a_idx, b_col = np.nonzero(dup)
    pairs = {}
    for a, col in zip(a_idx.tolist(), b_col.tolist()):
        b = int(nb_pos[a, col])
        union(a, b)
        pairs[(min(a, b), max(a, b))] = float(nb_sim[a, col])
    ids = [r["id"] for r in database.records(rows)]
    members: dict[int, list[int]] = {}
    for a, b in pairs:
        for m in (a, b):
            members.setdefault(find(m), []).append(m)
    pairs_of: dict[int, list] = {}
    for (a, b), sim in sorted(pairs.items()):
        pairs_of.setdefault(find(a), []).append([ids[a], ids[b], round(sim, 6)])
    dup_groups = []
    for root in sorted(members):
        group = sorted(set(members[root]))
        dup_groups.append({"keep": ids[group[0]], "drop": [ids[m] for m in group[1:]], "pairs": pairs_of[root]})

    # outliers: mean cosine distance to the k nearest other items, the item's near-duplicates left out
    near = others & ~dup
    use = near & (np.cumsum(near, 1) <= k)
    count = use.sum(1)
    fallback = others & (np.cumsum(others, 1) <= k)  # an item whose every neighbour is a duplicate of it
    use = np.where((count > 0)[:, None], use, fallback)
    sims = np.where(use, nb_sim, 0.0).sum(1) / np.maximum(use.sum(1), 1)
    knn_distance = (1.0 - sims).astype(np.float32)  # far from its own neighbourhood: a different kind of image
    centroid = vectors.mean(0)
    centroid /= max(np.linalg.norm(centroid), 1e-12)
    centroid_distance = (1.0 - vectors @ centroid).astype(np.float32)
    spread = mahalanobis(vectors, options.batch_size)  # off the collection's shape: off-style
    scores = np.maximum(robust_z(knn_distance), robust_z(spread))
    if options.outlier_threshold is not None:
        threshold, rule = float(options.outlier_threshold), f"score > {options.outlier_threshold:g} (given)"
    else:
        threshold = options.mad_factor
        rule = (f"score > {threshold:g}; score: the larger robust z-score (distance minus the median, over 1.4826 x "
                "MAD) of an item's mean cosine distance to its k nearest other items and of its Mahalanobis distance "
                "from the collection (Ledoit-Wolf shrunk covariance)")
    order = np.argsort(-scores, kind="stable")
    outliers = [{"id": ids[i], "score": round(float(scores[i]), 4), "knn_distance": round(float(knn_distance[i]), 6),
                 "centroid_distance": round(float(centroid_distance[i]), 6), "mahalanobis": round(float(spread[i]), 4),
                 "nearest": [ids[j] for j in nb_pos[i] if j >= 0 and j != i][:3]}
                for i in order if scores[i] > threshold]

    # the style card covers what stays: outliers and the copies a group drops are left out of it
    stays = scores <= threshold
    if dup_groups:
        position = {item: i for i, item in enumerate(ids)}
        stays[[position[d] for g in dup_groups for d in g["drop"]]] = False
    keep = np.flatnonzero(stays) if stays.any() else np.arange(n)
    reps = [ids[int(keep[i])] for i in k_center(vectors[keep], options.n_representatives)]
    coherence = {"knn_similarity": round(float(nb_sim[others].mean()), 6) if others.any() else None,
                 "centroid_similarity": round(float(np.mean(vectors @ centroid)), 6)}
    return CurateReport(database.name, n, asdict(options), dup_groups, outliers, round(threshold, 6), rule, reps,
                        coherence, {ids[i]: round(float(scores[i]), 6) for i in range(n)})


def apply(database, report: CurateReport, kinds: Sequence[str], dry_run: bool = False) -> dict[str, str]:
    """Remove what the report flags for these kinds (Database.remove: tombstones, one commit); {id: reason}."""
    flagged = report.flagged(kinds)
    if dry_run or not flagged:
        return flagged
    database.remove(sorted(flagged), reason={"action": "curate", "kinds": list(kinds), "reasons": flagged})
    return flagged


remove_flagged = apply  # `run` takes a parameter of that name


def run(db: str | Path, options: CurateOptions | None = None, apply: Sequence[str] = (), dry_run: bool = False,
        out: str | None = None, indexes: str | None = None, progress: bool = False):
    """`rdm curate NAME`: open the database, curate it, write the report files (`out`), remove what `apply` names:
    (report, {id: reason} removed or, with dry_run, to be removed, written files)."""
    from ..db import open_database
    from .report import write_report

    database = open_database(db, indexes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=database.count, desc=f"curate {database.name}", unit="item", leave=False)
    report = curate(database, options or CurateOptions(),
                             progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
    if bar:
        bar.close()
    files = {}
    if out:
        shown = {g["keep"] for g in report.duplicate_groups} | report.flagged().keys() | set(report.representatives)
        shown |= {n for o in report.outliers for n in o["nearest"]}
        rows = database.rows_of(sorted(shown))
        paths = {r["id"]: r.get("path") for r in database.records(sorted(rows.values()))}
        files = write_report(report, paths, out)
    removed = remove_flagged(database, report, parse_kinds(apply), dry_run) if apply else {}
    return report, removed, files


__all__ = ["CurateOptions", "CurateReport", "KINDS", "apply", "curate", "k_center", "mahalanobis", "parse_kinds", "run"]
