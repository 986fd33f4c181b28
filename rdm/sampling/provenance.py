"""Provenance: what made an image, recorded beside it so it can be reproduced and audited.

Every generated image gets one `Provenance`: its query, seed, the model (path and weights
fingerprint), each database (name and content fingerprint), the very neighbours that conditioned it,
the scheduler and its settings, the size, and the versions of the packages that ran. `rdm sample`
writes it as JSON beside the PNG, with the same stem.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT = "rdm-provenance"
FORMAT_VERSION = 1
PACKAGES = ("rdm", "torch", "diffusers", "open_clip_torch", "faiss-cpu", "numpy")


@dataclass
class Provenance:
    """Everything needed to reproduce (or audit) one generated image."""

    query: dict  # {"prompt": str} | {"image": label} | {"embedding": True}: what was asked for
    seed: int | None  # seed of this image's initial noise; None when a generator or latents were passed in
    model: dict  # name_or_path, fingerprint (sha256 of its safetensors), embedder identity, source
    databases: list[dict]  # per source: name, fingerprint, weight, count, k_asked, k_drawn
    neighbours: list[dict]  # in context order: database, id, score, row, path, caption ... (or ref, score)
    scheduler: dict  # name, num_inference_steps, guidance_scale, guidance_rescale, style_scale, eta, config
    size: dict  # height, width in pixels
    runtime: dict  # device, dtype
    where: dict = field(default_factory=dict)  # metadata filters applied inside the search
    k: int | None = None  # neighbours asked for (None when neighbour embeddings were passed in)
    index: int = 0  # position of the image in its batch
    warnings: list[str] = field(default_factory=list)  # e.g. k clamped to a database's size
    control: dict = field(default_factory=dict)  # neighbour control: diversity, weights, negatives ... ({}: none)
    edit: dict = field(default_factory=dict)  # image-to-image / inpainting: input digest, strength, mask ({}: none)
    attributions: list[str] = field(default_factory=list)  # credits the neighbours' collections ask for, once each
    copy_guard: dict = field(default_factory=dict)  # near-copy check: nearest item, similarity, flagged ({}: off)
    versions: dict = field(default_factory=lambda: package_versions())  # package -> version
    format: str = FORMAT  # always "rdm-provenance"
    format_version: int = FORMAT_VERSION  # bumped on incompatible changes

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape an image (None when one is missing), and Python's."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def scheduler_record(scheduler, num_inference_steps: int, guidance_scale: float, eta: float,
                     style_scale: float | None = None, guidance_rescale: float = 0.0) -> dict:
    """The scheduler's class, sampling settings (style_scale None: plain guidance) and full config (JSON types)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"name": type(scheduler).__name__, "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale, "style_scale": style_scale,
            "eta": eta,
            "config": json.loads(json.dumps(config, default=str))}


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically and durably (rdm.db.store.atomic_write)."""
    from ..util.files import atomic_write

    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)
