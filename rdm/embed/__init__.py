"""The CLIP embedder: its identity (what made a database's vectors) and the open_clip model that encodes images and
text; `load_embedder` loads one per process, `embedder_for(db)` the one that made a database."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DatabaseError

if TYPE_CHECKING:
    from ..db.database import Database  # a type only: embed sits below db
    from .embedder import Embedder
    from .identity import IdentityOnly


def load_embedder(model_id: str, device: str | None = None, dtype: str = "auto") -> "Embedder":
    """Load (once per process) an embedder by model id."""
    from .embedder import load_cached

    return load_cached(model_id, device, dtype)


def embedder_for(db: "Database", device: str | None = None) -> "Embedder":
    """The embedder that made a database's vectors; refuse one whose weights differ."""
    emb = load_embedder(db.identity.model, device)
    if not emb.identity.same_vectors_as(db.identity):
        raise DatabaseError(f"database {db.name} was built with {db.identity.describe()}, but "
                            f"{db.identity.model} now loads as {emb.identity.describe()}")
    return emb


def identity_for_vectors(model_id: str, dim: int) -> "IdentityOnly":
    """What records precomputed `dim`-d vectors (rdm.embed.embedder.embedder_for_vectors: the CLIP's full
    identity when its weights are on this machine, else its id), computed in a spawned child: loading a
    CLIP imports torch and open_clip (~0.9 GB resident) that a build of the vectors never needs."""
    from ..util.spawn import in_child
    from .identity import EmbedderIdentity, IdentityOnly

    return IdentityOnly(EmbedderIdentity.from_dict(in_child(_vector_identity, model_id, dim)))


def _vector_identity(model_id: str, dim: int) -> dict:
    from .embedder import embedder_for_vectors

    return embedder_for_vectors(model_id, dim).identity.to_dict()


__all__ = ["embedder_for", "identity_for_vectors", "load_embedder"]
