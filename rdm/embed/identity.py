"""The identity of the CLIP that made a database's vectors: recorded in databases and models, compared once.

Kept free of torch and open_clip, so reading manifests (rdm list, rdm info) imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CLIP = "ViT-L-14:openai"


def local_dir_canonical(model_id: str) -> str:
    """A model id with a local-dir path made absolute (the form identities record); other ids as given."""
    prefix = "local-dir:"
    if not model_id.startswith(prefix):
        return model_id
    return prefix + str(Path(model_id[len(prefix):]).expanduser().resolve())


@dataclass(frozen=True)
class EmbedderIdentity:
    """What a database records about the CLIP that made its vectors, and what a model checks."""

    model: str  # the id it was loaded from, e.g. "ViT-L-14:openai" or "local-dir:/abs/path"
    architecture: str  # open_clip architecture name or config summary
    weights_sha256: str | None  # checksum of the float32 state dict (sorted keys); None: recorded by id only
    dim: int  # embedding dimension
    preprocess: dict = field(default_factory=dict)  # size, mean, std, interpolation, resize_mode

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EmbedderIdentity":
        return cls(model=d["model"], architecture=d.get("architecture", ""), weights_sha256=d.get("weights_sha256"),
                   dim=int(d["dim"]), preprocess=dict(d.get("preprocess") or {}))

    def same_vectors_as(self, other: "EmbedderIdentity") -> bool:
        """True when both produce the same vectors: same weights, dim and preprocessing.

        An identity recorded by id only (weights unknown: precomputed vectors, a converted checkpoint
        whose CLIP was not on the machine) matches the same model id and dim, and the preprocessing
        where both record it.
        """
        if self.dim != other.dim:
            return False
        if self.weights_sha256 and other.weights_sha256:
            return (self.weights_sha256 == other.weights_sha256
                    and _norm_pre(self.preprocess) == _norm_pre(other.preprocess))
        pre_a, pre_b = _norm_pre(self.preprocess), _norm_pre(other.preprocess)
        return self.model == other.model and (not pre_a or not pre_b or pre_a == pre_b)

    def describe(self) -> str:
        weights = self.weights_sha256[:12] if self.weights_sha256 else "recorded by id"
        return f"{self.model} (dim {self.dim}, weights {weights})"


def _norm_pre(p: Mapping) -> dict:
    """Preprocess dict with tuples as lists, so JSON round-trips compare equal."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in (p or {}).items()}


@dataclass(frozen=True)
class IdentityOnly:
    """What a build of precomputed vectors records (`identity`, `dim`), with nothing to embed with.

    Either a CLIP known by id and dim alone, whose weights are not on this machine (`identity_only`:
    no weights checksum, so models and databases match it by model id and dim,
    `EmbedderIdentity.same_vectors_as`), or the full identity of a local CLIP computed in a child
    process (`identity_for_vectors`), so that a build of 10M vectors never imports torch.
    """

    identity: EmbedderIdentity

    @property
    def dim(self) -> int:
        return self.identity.dim
