"""Retrieval conditioning: a query and its k nearest neighbours -> the U-Net's context tokens.

RDM (Blattmann et al. 2022, "Retrieval-Augmented Diffusion Models", Sec. 3) conditions the denoiser on
the CLIP image embeddings of k neighbours retrieved from an external database, never on the pixels.
The text-guided models of Rombach et al. 2022 ("Text-Guided Synthesis of Artistic Images with
Retrieval-Augmented Diffusion Models", Sec. 2) put the CLIP embedding of the query itself first, so

    context = [phi(query), phi(n_1), ..., phi(n_k)]                    # (B, 1+k, D)

with the neighbours in order of decreasing similarity to the query, exactly as the stored vectors of
the database (CompVis `scripts/knn2img.py`: `c = torch.cat([c, nn_embeddings], dim=1)`), and an
unconditional context of zeros of the same shape for classifier-free guidance (`uc = torch.zeros_like(c)`).

Everything here is a small pure function over numpy/torch arrays plus `retrieve`, which only calls the
`search` contract of `rdm.db.retrieval.Retriever`, so any retriever with that contract can stand in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..db.database import parse_where
from ..db.licence import generation_where
from ..db.retrieval import Retriever
from ..embed.identity import EmbedderIdentity
from ..errors import DatabaseError, NotFound, RDMError
from ..sources import json_safe
from .selection import Selection, select


class RetrievalWarning(UserWarning):
    """Fewer neighbours than asked for (k beyond a database's size, or filters matching few items)."""


@dataclass
class Neighbours:
    """The neighbours of each query, in context order (most similar first)."""

    embeddings: np.ndarray  # (Q, k, D) float32, the vectors exactly as stored (or as embedded for refs)
    scores: np.ndarray  # (Q, k) cosine similarity of each neighbour to its query
    hits: list[list[dict]]  # per query, per neighbour: database, id, score, row, path, caption, ... (JSON-able)
    drawn: list[dict] = field(default_factory=list)  # per source: name, fingerprint, weight, k asked, k drawn
    notes: list[str] = field(default_factory=list)  # warnings raised while retrieving, for provenance
    weights: np.ndarray | None = None  # (Q, k) attention weight of each neighbour (rdm.sampling.attention); None: all 1

    @property
    def k(self) -> int:
        return self.embeddings.shape[1]

    @property
    def weighted(self) -> bool:
        return self.weights is not None and not np.all(self.weights == 1.0)

    def repeat(self, n: int) -> "Neighbours":
        """Each query's neighbours repeated n times in a row (num_images_per_prompt)."""
        return Neighbours(np.repeat(self.embeddings, n, axis=0), np.repeat(self.scores, n, axis=0),
                          [h for h in self.hits for _ in range(n)], self.drawn, self.notes,
                          None if self.weights is None else np.repeat(self.weights, n, axis=0))


# --- Embedders -------------------------------------------------------------------------------------

def describe_embedder(identity: Mapping[str, Any]) -> str:
    """'MODEL (dim D, weights 0123456789ab)' for an embedder identity dict."""
    sha = identity.get("weights_sha256")
    return f"{identity.get('model')} (dim {identity.get('dim')}" + (f", weights {sha[:12]})" if sha else ")")


def same_embedder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The one identity rule (EmbedderIdentity.same_vectors_as) on identity dicts."""
    return EmbedderIdentity.from_dict(a).same_vectors_as(EmbedderIdentity.from_dict(b))


def check_embedder(model: Mapping[str, Any], database: Mapping[str, Any], database_name: str) -> None:
    """Refuse a database whose vectors come from another CLIP than the one the model was trained with."""
    if not same_embedder(model, database):
        raise DatabaseError(
            f"database {database_name} was built with {describe_embedder(database)}, but the model expects "
            f"{describe_embedder(model)}; rebuild the database with `rdm build-index SOURCE --clip "
            f"{model.get('model')}` or use a model made for that embedder")


# --- Several databases -----------------------------------------------------------------------------

def largest_remainder(k: int, weights: Sequence[float]) -> list[int]:
    """Apportion k neighbours to sources by weight with the largest-remainder (Hamilton) method."""
    if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise RDMError(f"database weights must be non-negative with a positive sum, got {list(weights)}")
    quotas = [k * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))  # ties: first listed
    for i in by_remainder[:k - sum(counts)]:
        counts[i] += 1
    return counts


def parse_database_spec(spec: str) -> tuple[str, float]:
    """'name' -> (name, 1.0); 'name:0.3' -> (name, 0.3). A suffix that is not a number stays in the name."""
    name, sep, weight = spec.rpartition(":")
    if sep and name:
        try:
            return name, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def _valid_columns(rows: np.ndarray) -> list[list[int]]:
    """Per query, the positions of real (non -1) results, in the order the retriever returned them."""
    return [[j for j in range(rows.shape[1]) if rows[q, j] >= 0] for q in range(rows.shape[0])]


def retrieve(queries: np.ndarray, sources: Sequence[tuple[Retriever, float]], k: int,
             where: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
             selection: Selection = Selection()) -> Neighbours:
    """k neighbours per query (Q, D), drawn from the sources in proportion to their weights, merged by similarity.

    Each source gets largest_remainder(k, weights) of the k slots; a source with fewer items (or fewer
    matching the filters) than its share gives what it has, with a warning. The merged neighbours are
    sorted by similarity to their query, whichever database they came from (all share one CLIP space).
    With a `selection` other than nearest-k (rdm.sampling.selection: diversity, duplicates, at most N per metadata value),
    each source's candidates are over-fetched and its share chosen among them.
    """
    queries = np.asarray(queries, np.float32)  # (Q, D)
    where = parse_where(where)
    shares = largest_remainder(k, [w for _, w in sources])
    notes: list[str] = []
    parts, drawn = [], []  # parts: per source (embeddings (Q, m, D), scores (Q, m), hits)
    for (retriever, weight), share in zip(sources, shares):
        name = getattr(retriever, "name", type(retriever).__name__)
        asked = share
        count = getattr(retriever, "count", None)
        if count is not None and share > count:
            notes.append(f"k={share} neighbours asked of database {name}, which holds only {count} items; "
                         f"using {count}")
            share = count
        got = 0
        rule = getattr(retriever, "licence_rule", None)
        if share > 0:
            result, valid = _draw(retriever, queries, share, count, generation_where(rule, where), selection)
            got = min(min(len(v) for v in valid), share)
            if got < share:
                limits = " and ".join(filter(None, (f"the filters {where}" if where else "", f"its licence rule "
                                                    f"({rule.column}: {', '.join(rule.allow)})" if rule else "")))
                notes.append(f"only {got} item(s) of database {name} {f'match {limits}' if limits else 'were found'}; "
                             f"using {got} instead of {share} neighbours")
            cols = np.array([v[:got] for v in valid], np.int64).reshape(len(queries), got)  # (Q, got)
            scores = np.take_along_axis(result.scores, cols, 1).astype(np.float32)
            embeddings = np.take_along_axis(result.embeddings(), cols[..., None], 1)  # (Q, got, D)
            hits = [[{"database": name, **{key: json_safe(v) for key, v in h.items()}, **credit(h, rule)}
                     for h in _hits_at(result, q, rows)] for q, rows in enumerate(cols)]
            parts.append((embeddings, scores, hits))
        drawn.append({"name": name, "fingerprint": getattr(retriever, "fingerprint", None), "weight": weight,
                      "count": count, "k_asked": asked, "k_drawn": got,
                      **({"licence_rule": rule.to_dict()} if rule is not None else {})})
    for note in notes:
        warnings.warn(note, RetrievalWarning, stacklevel=2)
    if k > 0 and sum(d["k_drawn"] for d in drawn) == 0:
        raise NotFound(f"no neighbours: the databases hold no items matching {where or 'the query'}")
    dim = queries.shape[1]
    embeddings = np.concatenate([p[0] for p in parts], 1) if parts else np.zeros((len(queries), 0, dim), np.float32)
    scores = np.concatenate([p[1] for p in parts], 1) if parts else np.zeros((len(queries), 0), np.float32)
    hits = [sum((p[2][q] for p in parts), []) for q in range(len(queries))]
    return sort_by_similarity(Neighbours(embeddings, scores, hits, drawn, notes))


def _draw(retriever: Retriever, queries: np.ndarray, share: int, count: int | None, where,
          selection: Selection) -> tuple[Any, list[list[int]]]:
    """One source's search result and, per query, the result columns of its neighbours: the nearest `share`, or
    `share` chosen by the selection among over-fetched candidates (fetched again, four times as many, while a
    max-per limit leaves fewer than `share` and the database holds more)."""
    fetch = selection.candidates(share) if count is None else min(selection.candidates(share), count)
    while True:
        result = retriever.search(queries, k=fetch, where=where or None)
        valid = _valid_columns(result.rows)
        if selection.nearest:
            return result, valid
        vectors = result.embeddings()
        chosen = [[v[j] for j in select(result.scores[q, v], vectors[q, v], result.hits(q), share, selection)]
                  for q, v in enumerate(valid)]
        short = min(len(c) for c in chosen) < share and min(len(v) for v in valid) == fetch
        if not short or count is None or fetch >= count:
            return result, chosen
        fetch = min(fetch * 4, count)


def credit(hit: dict, rule) -> dict:
    """The licence and attribution a collection's rule names for an item, under those two keys."""
    if rule is None:
        return {}
    out = {"licence": json_safe(hit.get(rule.column))}
    if rule.attribution:
        out["attribution"] = json_safe(hit.get(rule.attribution))
    return out


def _hits_at(result, q: int, positions: np.ndarray) -> list[dict]:
    """The hit records of query q at the given result positions (hits(q) lists the valid results in order)."""
    valid = [j for j in range(result.rows.shape[1]) if result.rows[q, j] >= 0]
    records = result.hits(q)
    return [records[valid.index(int(j))] for j in positions]


def sort_by_similarity(n: Neighbours) -> Neighbours:
    """Neighbours of each query in order of decreasing similarity (stable: ties keep source order)."""
    order = np.argsort(-n.scores, axis=1, kind="stable")  # (Q, k)
    return Neighbours(np.take_along_axis(n.embeddings, order[..., None], 1), np.take_along_axis(n.scores, order, 1),
                      [[hq[j] for j in oq] for hq, oq in zip(n.hits, order)], n.drawn, n.notes,
                      None if n.weights is None else np.take_along_axis(n.weights, order, 1))


def reference_neighbours(queries: np.ndarray | None, refs: np.ndarray, labels: Sequence[str],
                         weights: Sequence[float] | None = None) -> Neighbours:
    """Images given directly (R, D) as every query's neighbours, sorted by similarity when there is a query;
    `weights` (R,): each reference's attention weight (rdm sample --ref IMG:W)."""
    refs = np.asarray(refs, np.float32)  # (R, D)
    n_queries = 1 if queries is None else len(queries)
    scores = (np.zeros((n_queries, len(refs)), np.float32) if queries is None
              else np.asarray(queries, np.float32) @ refs.T)  # (Q, R)
    w = None if weights is None else np.broadcast_to(np.asarray(weights, np.float32), scores.shape).copy()
    hits = [[{"ref": label, "score": float(s), **({} if w is None else {"weight": float(wi)})}
             for label, s, wi in zip(labels, sq, w[0] if w is not None else [None] * len(labels))] for sq in scores]
    n = Neighbours(np.broadcast_to(refs, (n_queries, *refs.shape)).copy(), scores, hits,
                   [{"name": "refs", "fingerprint": None, "weight": 1.0, "count": len(refs),
                     "k_asked": len(refs), "k_drawn": len(refs)}], weights=w)
    return n if queries is None else sort_by_similarity(n)


# --- Control over the neighbours -------------------------------------------------------------------

WEIGHTINGS = ("uniform", "database", "score")


@dataclass(frozen=True)
class NeighbourControl:
    """What a sampler does with the neighbours beyond retrieving them (rdm sample --diversity, --negative-db ...).

    NeighbourControl() is plain retrieval conditioning, bit for bit.
    """

    selection: Selection = field(default_factory=Selection)  # diversity, duplicates, at most N per value
    weighting: str = "uniform"  # per-neighbour weight: uniform (1), database (its --db weight), score (s_i / s_1)
    negative_databases: Any = None  # like `databases`: neighbours the sample is guided away from
    negative_refs: Sequence = ()  # images the sample is guided away from
    negative_prompt: str | None = None  # its CLIP text embedding takes the unconditional context's query slot
    content_subtract: float = 0.0  # each neighbour minus this times the query embedding, renormalised (InstantStyle)
    window: tuple[float, float] = (0.0, 1.0)  # the fraction of the denoising steps in which the neighbours act

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise RDMError(f"neighbour weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not (math.isfinite(self.content_subtract) and 0.0 <= self.content_subtract <= 2.0):
            raise RDMError(f"content_subtract must be in [0, 2] (0: off; InstantStyle uses ~1), got "
                           f"{self.content_subtract}")
        start, end = (float(x) for x in self.window)
        if not 0.0 <= start <= end <= 1.0:  # START == END: the neighbours act in no step (the query alone)
            raise RDMError(f"the neighbour window START:END needs 0 <= START <= END <= 1, got {start}:{end}")
        object.__setattr__(self, "window", (start, end))
        object.__setattr__(self, "negative_refs", tuple(self.negative_refs or ()))

    @property
    def negatives(self) -> bool:
        return bool(self.negative_databases) or bool(self.negative_refs)

    def active(self, step: int, steps: int) -> bool:
        """Whether the neighbours act at denoising step `step` of `steps` (0 = the noisiest)."""
        start, end = self.window
        return start <= step / steps < end

    def to_dict(self) -> dict:
        return {**self.selection.to_dict(), "weighting": self.weighting,
                "negative_prompt": self.negative_prompt, "content_subtract": self.content_subtract,
                "window": list(self.window)}


def parse_window(spec: str | Sequence[float] | None) -> tuple[float, float]:
    """'0.2:0.8' -> (0.2, 0.8); None -> (0, 1)."""
    if spec is None:
        return (0.0, 1.0)
    if isinstance(spec, str):
        start, sep, end = spec.partition(":")
        try:
            return (float(start or 0), float(end or 1)) if sep else _bad_window(spec)
        except ValueError:
            return _bad_window(spec)
    return tuple(float(x) for x in spec)


def _bad_window(spec: str):
    raise RDMError(f"neighbour window '{spec}' is not START:END as fractions of the schedule (e.g. 0:0.6)")


def parse_weighted(spec: str) -> tuple[str, float]:
    """'img.png:0.5' -> ('img.png', 0.5); 'img.png' -> ('img.png', 1.0); a suffix that is not a number stays."""
    name, weight = parse_database_spec(spec)
    if not (math.isfinite(weight) and weight >= 0):
        raise RDMError(f"the weight in '{spec}' must be a finite number >= 0")
    return name, weight


def neighbour_weights(n: Neighbours, weighting: str) -> Neighbours:
    """The neighbours with the weighting's per-neighbour weights (refs keep the weights they were given)."""
    if weighting == "uniform" or n.k == 0:
        return n
    if weighting == "database":
        by_name = {d["name"]: float(d["weight"]) for d in n.drawn}
        w = np.array([[by_name.get(h.get("database"), 1.0) for h in hq] for hq in n.hits], np.float32)
    else:  # score: relative to the nearest neighbour of the query, negative similarities count 0
        best = np.maximum(n.scores.max(1, keepdims=True), 1e-6)
        w = np.clip(n.scores / best, 0.0, None).astype(np.float32)
    w = w if n.weights is None else w * n.weights
    hits = [[{**h, "weight": float(wi)} for h, wi in zip(hq, wq)] for hq, wq in zip(n.hits, w)]
    return Neighbours(n.embeddings, n.scores, hits, n.drawn, n.notes, w)


def subtract_content(n: Neighbours, query: np.ndarray | None, amount: float) -> Neighbours:
    """Each neighbour minus `amount` times its query's embedding, renormalised: the global-feature trick of
    InstantStyle (Wang et al. 2024), keeping the retrieved images' content out of the style they give."""
    if amount == 0 or query is None or n.k == 0:
        return n
    e = n.embeddings - amount * np.asarray(query, np.float32)[:, None, :]
    e /= np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-6)
    return Neighbours(e.astype(np.float32), n.scores, n.hits, n.drawn, n.notes, n.weights)


def fit_to(embeddings: np.ndarray, k: int) -> np.ndarray:
    """(Q, m, D) negatives cut or zero-padded to (Q, k, D): the shape of the context they stand in for."""
    q, m, d = embeddings.shape
    if m >= k:
        return embeddings[:, :k]
    return np.concatenate([embeddings, np.zeros((q, k - m, d), np.float32)], 1)


# --- Context tokens --------------------------------------------------------------------------------

def build_context(query: torch.Tensor | None, neighbours: torch.Tensor, query_token: bool = True) -> torch.Tensor:
    """context = [query, n_1..n_k] (B, 1+k, D) (Rombach et al. 2022), or the k neighbours alone (B, k, D)."""
    if query_token:
        if query is None:
            raise RDMError("this model puts the query's embedding first in its context: give a prompt, an image "
                           "or query_embeds")
        if query.dim() != 2 or neighbours.dim() != 3 or query.shape[0] != neighbours.shape[0] \
                or query.shape[1] != neighbours.shape[2]:
            raise RDMError(f"query (B, D) and neighbours (B, k, D) disagree: {tuple(query.shape)} and "
                           f"{tuple(neighbours.shape)}")
        return torch.cat([query[:, None, :], neighbours.to(query)], dim=1)  # (B, 1+k, D)
    if neighbours.shape[1] == 0:
        raise RDMError("this model is conditioned on neighbours only (query_token=False): give a database, "
                       "refs or neighbor_embeds with k >= 1")
    return neighbours  # (B, k, D)


def unconditional_context(context: torch.Tensor, kind: str = "zeros",
                          null_context: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance's context: zeros like `context` (CompVis knn2img.py) or the learned null tokens."""
    if kind == "zeros":
        return torch.zeros_like(context)  # (B, T, D)
    if kind != "learned" or null_context is None:
        raise RDMError(f"unconditional context '{kind}' needs a learned null_context")
    tokens = null_context.to(context)  # (T', D)
    if tokens.shape[0] not in (1, context.shape[1]):
        raise RDMError(f"the model's learned null context has {tokens.shape[0]} tokens but the context has "
                       f"{context.shape[1]}; sample with k = {tokens.shape[0] - 1} neighbours")
    return tokens.expand(context.shape[0], context.shape[1], -1)  # (B, T, D)


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance eps_u + s * (eps_c - eps_u) (Ho & Salimans 2022, as CompVis ddim.py)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def query_only_context(context: torch.Tensor) -> torch.Tensor:
    """[query, 0, ..., 0] (B, 1+k, D): the context with its neighbour slots zeroed, the query kept."""
    return torch.cat([context[:, :1], torch.zeros_like(context[:, 1:])], dim=1)  # (B, 1+k, D)


def style_guided_noise(eps_uncond: torch.Tensor, eps_query: torch.Tensor, eps_full: torch.Tensor, scale: float,
                       style_scale: float) -> torch.Tensor:
    """Two-condition guidance eps_0 + s_q (eps_q - eps_0) + s_nn (eps_qnn - eps_q) (Brooks et al. 2023,
    InstructPix2Pix, Eq. 3; Chen et al. 2022, Re-Imagen, Sec. 3.2): s_nn = s_q is plain guidance, 0 the query alone."""
    return eps_uncond + scale * (eps_query - eps_uncond) + style_scale * (eps_full - eps_query)
