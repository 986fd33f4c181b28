"""Which of a query's candidates become its neighbours: near-duplicates collapsed, maximal marginal relevance, at most
N per metadata value.

Nearest-k retrieval returns the k most similar items, which in a real collection are often the same picture
several times (resized, re-encoded) or ten works of one artist. `Selection` over-fetches candidates and picks k of
them greedily by maximal marginal relevance (Carbonell & Goldstein 1998, as Qdrant, Weaviate and OpenSearch ship it):

    next = argmax_i  (1 - diversity) * sim(query, c_i) - diversity * max_j sim(c_i, s_j)      over unselected c_i

with s_j the items already selected, skipping candidates above the duplicate threshold to one already selected
(clip-retrieval's client deduplicates at 0.95 by default) and candidates whose metadata value has reached its
`max_per` count. Duplicates are taken only when nothing else is left, so the result has exactly k items whenever
the candidates allow. `Selection()` (diversity 0, no threshold, no limits) is today's nearest-k, and `retrieve`
does not even over-fetch for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..errors import RDMError

AUTO_DEDUP = 0.95  # the duplicate threshold when diversity is asked for and no threshold is given (clip-retrieval's)


@dataclass(frozen=True)
class Selection:
    """How k neighbours are chosen among a query's candidates (rdm sample --diversity / --dedup / --max-per)."""

    diversity: float = 0.0  # MMR trade-off in [0, 1]: 0 nearest-k, 1 only novelty
    dedup: float | None = None  # cosine above which two items are duplicates; None: AUTO_DEDUP with diversity, else off
    max_per: Mapping[str, int] = field(default_factory=dict)  # metadata column -> most neighbours sharing one value
    overfetch: int = 4  # candidates fetched per neighbour asked (at least k + 16)

    def __post_init__(self):
        if not (math.isfinite(self.diversity) and 0.0 <= self.diversity <= 1.0):
            raise RDMError(f"diversity must be in [0, 1] (0: the nearest k), got {self.diversity}")
        if self.dedup is not None and not (math.isfinite(self.dedup) and -1.0 <= self.dedup <= 1.0):
            raise RDMError(f"the duplicate threshold is a cosine in [-1, 1], got {self.dedup}")
        for column, n in self.max_per.items():
            if not isinstance(n, int) or n < 1:
                raise RDMError(f"--max-per {column}={n}: the count must be an integer >= 1")
        object.__setattr__(self, "max_per", dict(self.max_per))

    @property
    def threshold(self) -> float | None:
        """The duplicate threshold in force."""
        return self.dedup if self.dedup is not None else AUTO_DEDUP if self.diversity > 0 else None

    @property
    def nearest(self) -> bool:
        """True when this is plain nearest-k (nothing to select: no over-fetching)."""
        return self.diversity == 0 and self.threshold is None and not self.max_per

    def candidates(self, k: int) -> int:
        """Candidates to fetch for k neighbours."""
        return k if self.nearest else max(k * self.overfetch, k + 16)

    def to_dict(self) -> dict:
        return {"diversity": self.diversity, "dedup": self.threshold, "max_per": dict(self.max_per)}


def parse_max_per(specs: Sequence[str] | Mapping[str, int] | None) -> dict[str, int]:
    """["artist=2", "source=1"] -> {"artist": 2, "source": 1}."""
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return {str(k): int(v) for k, v in specs.items()}
    out = {}
    for spec in specs:
        column, sep, n = spec.partition("=")
        try:
            out[column.strip()] = int(n)
        except ValueError:
            sep = ""
        if not sep or not column.strip():
            raise RDMError(f"--max-per '{spec}' is not COLUMN=N (e.g. artist=2)")
    return out


def select(query_scores: np.ndarray, vectors: np.ndarray, hits: Sequence[Mapping], k: int,
           selection: Selection) -> list[int]:
    """Positions of the k candidates chosen (in the order chosen) among one query's m candidates.

    query_scores (m,) similarity to the query; vectors (m, D) unit vectors; hits: each candidate's record (for
    max_per). Fewer than k only when max_per leaves fewer candidates.
    """
    m = len(query_scores)
    if m == 0 or k <= 0:
        return []
    sims = vectors @ vectors.T  # (m, m) cosine between candidates
    lam, threshold = selection.diversity, selection.threshold
    redundancy = np.full(m, -np.inf)  # max similarity to the selected so far
    chosen: list[int] = []
    taken = np.zeros(m, bool)
    counts: dict[tuple[str, str], int] = {}

    def allowed(i: int) -> bool:
        return all(counts.get((c, str(hits[i].get(c))), 0) < n for c, n in selection.max_per.items())

    while len(chosen) < k:
        open_ = [i for i in range(m) if not taken[i] and allowed(i)]
        if not open_:
            break
        fresh = [i for i in open_ if threshold is None or redundancy[i] <= threshold]
        pool = np.array(fresh or open_)  # duplicates only when nothing else is left
        red = np.where(np.isfinite(redundancy[pool]), redundancy[pool], 0.0)
        value = (1 - lam) * query_scores[pool] - lam * red
        best = int(pool[int(np.argmax(value))])  # ties: the nearer candidate (candidates come nearest first)
        chosen.append(best)
        taken[best] = True
        redundancy = np.maximum(redundancy, sims[best])
        for c in selection.max_per:
            key = (c, str(hits[best].get(c)))
            counts[key] = counts.get(key, 0) + 1
    return chosen


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    """Mean cosine over the distinct pairs of each query's neighbours (Q, k, D), averaged over queries."""
    e = np.asarray(embeddings, np.float32)
    if e.shape[1] < 2:
        return float("nan")
    g = e @ e.transpose(0, 2, 1)  # (Q, k, k)
    k = e.shape[1]
    off = ~np.eye(k, dtype=bool)
    return float(g[:, off].mean())
