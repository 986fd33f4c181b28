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
`search` contract of `rdm.retrieval.Retriever`, so any retriever with that contract can stand in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .database import parse_where
from .errors import DatabaseError, RDMError
from .identity import EmbedderIdentity
from .retrieval import Retriever
from .sources import json_safe


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

    @property
    def k(self) -> int:
        return self.embeddings.shape[1]

    def repeat(self, n: int) -> "Neighbours":
        """Each query's neighbours repeated n times in a row (num_images_per_prompt)."""
        return Neighbours(np.repeat(self.embeddings, n, axis=0), np.repeat(self.scores, n, axis=0),
                          [h for h in self.hits for _ in range(n)], self.drawn, self.notes)


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
             where: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> Neighbours:
    """k neighbours per query (Q, D), drawn from the sources in proportion to their weights, merged by similarity.

    Each source gets largest_remainder(k, weights) of the k slots; a source with fewer items (or fewer
    matching the filters) than its share gives what it has, with a warning. The merged neighbours are
    sorted by similarity to their query, whichever database they came from (all share one CLIP space).
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
        if share > 0:
            result = retriever.search(queries, k=share, where=where or None)
            valid = _valid_columns(result.rows)
            got = min(len(v) for v in valid)
            if got < share:
                notes.append(f"only {got} item(s) of database {name} "
                             f"{f'match the filters {where}' if where else 'were found'}; "
                             f"using {got} instead of {share} neighbours")
            cols = np.array([v[:got] for v in valid], np.int64).reshape(len(queries), got)  # (Q, got)
            scores = np.take_along_axis(result.scores, cols, 1).astype(np.float32)
            embeddings = np.take_along_axis(result.embeddings(), cols[..., None], 1)  # (Q, got, D)
            hits = [[{"database": name, **{key: json_safe(v) for key, v in h.items()}}
                     for h in result.hits(q)[:got]] for q in range(len(queries))]
            parts.append((embeddings, scores, hits))
        drawn.append({"name": name, "fingerprint": getattr(retriever, "fingerprint", None), "weight": weight,
                      "count": count, "k_asked": asked, "k_drawn": got})
    for note in notes:
        warnings.warn(note, RetrievalWarning, stacklevel=2)
    if k > 0 and sum(d["k_drawn"] for d in drawn) == 0:
        raise RDMError(f"no neighbours: the databases hold no items matching {where or 'the query'}")
    dim = queries.shape[1]
    embeddings = np.concatenate([p[0] for p in parts], 1) if parts else np.zeros((len(queries), 0, dim), np.float32)
    scores = np.concatenate([p[1] for p in parts], 1) if parts else np.zeros((len(queries), 0), np.float32)
    hits = [sum((p[2][q] for p in parts), []) for q in range(len(queries))]
    return sort_by_similarity(Neighbours(embeddings, scores, hits, drawn, notes))


def sort_by_similarity(n: Neighbours) -> Neighbours:
    """Neighbours of each query in order of decreasing similarity (stable: ties keep source order)."""
    order = np.argsort(-n.scores, axis=1, kind="stable")  # (Q, k)
    return Neighbours(np.take_along_axis(n.embeddings, order[..., None], 1), np.take_along_axis(n.scores, order, 1),
                      [[hq[j] for j in oq] for hq, oq in zip(n.hits, order)], n.drawn, n.notes)


def reference_neighbours(queries: np.ndarray | None, refs: np.ndarray, labels: Sequence[str]) -> Neighbours:
    """Images given directly (R, D) as every query's neighbours, sorted by similarity when there is a query."""
    refs = np.asarray(refs, np.float32)  # (R, D)
    n_queries = 1 if queries is None else len(queries)
    scores = (np.zeros((n_queries, len(refs)), np.float32) if queries is None
              else np.asarray(queries, np.float32) @ refs.T)  # (Q, R)
    hits = [[{"ref": label, "score": float(s)} for label, s in zip(labels, sq)] for sq in scores]
    n = Neighbours(np.broadcast_to(refs, (n_queries, *refs.shape)).copy(), scores, hits,
                   [{"name": "refs", "fingerprint": None, "weight": 1.0, "count": len(refs),
                     "k_asked": len(refs), "k_drawn": len(refs)}])
    return n if queries is None else sort_by_similarity(n)


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
