"""The copy guard: is a generated image a near-copy of an item it was conditioned on, or of its collection?

Each output is embedded with the model's own CLIP and compared (cosine) with its neighbours' stored vectors and with
the nearest item of each database it retrieved from; the closest item is also compared pixel by pixel (both at
PIXEL_SIDE x PIXEL_SIDE at most, mean absolute difference in [0, 1]). An output whose similarity reaches the threshold, or
whose pixels are within PIXEL_THRESHOLD of the closest item's, is flagged: in the result and its provenance
(`copy_guard`), on the page, or refused (`rdm sample --no-copies`).

The thresholds are calibrated on the demo model by scripts/calibrate_copy_guard.py (README: the distributions of
output-to-nearest-item similarity for ordinary samples, for deliberate copies and for item-to-item duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import RDMError

DEFAULT_THRESHOLD = 0.995  # cosine in the model's CLIP space; scripts/calibrate_copy_guard.py
PIXEL_THRESHOLD = 0.03  # mean absolute difference at PIXEL_SIDE^2, in [0, 1]
PIXEL_SIDE = 32


@dataclass(frozen=True)
class CopyGuard:
    """threshold: cosine at or above which an output is a near-copy; pixel_threshold: pixel distance at or below
    which it is one; refuse: the caller drops flagged outputs (rdm sample --no-copies)."""

    threshold: float = DEFAULT_THRESHOLD
    pixel_threshold: float = PIXEL_THRESHOLD
    refuse: bool = False

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise RDMError(f"the copy guard's threshold is a cosine in [-1, 1], got {self.threshold}")
        if not 0.0 <= self.pixel_threshold <= 1.0:
            raise RDMError(f"the copy guard's pixel threshold is in [0, 1], got {self.pixel_threshold}")


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images in RGB, in [0, 1], both at PIXEL_SIDE x PIXEL_SIDE (or the smaller
    one's side, so that a small output is not blurred up to be compared)."""
    side = min(PIXEL_SIDE, a.width, a.height, b.width, b.height)

    def small(im):
        return np.asarray(im.convert("RGB").resize((side, side), Image.BOX), np.float32) / 255.0
    return float(np.abs(small(a) - small(b)).mean())


def _item_image(hit: dict) -> Image.Image | None:
    """The pixels of a neighbour or database item (its stored path, or a --ref image), or None when unreadable."""
    from ..images.decode import Undecodable, decode_image  # the same decoding as builds: bombs and odd files refused

    source = hit.get("path") or hit.get("ref")
    if not source:
        return None
    try:
        return decode_image(source)
    except (Undecodable, OSError, ValueError):  # an item that cannot be read is compared by embedding only
        return None


def check(images: Sequence[Image.Image], embedder, neighbours: np.ndarray, hits: Sequence[Sequence[dict]],
          sources: Sequence[tuple[Any, float]] = (), guard: CopyGuard = CopyGuard()) -> list[dict]:
    """One verdict per image: {"flagged", "similarity", "nearest": {database, id | ref}, "pixel_distance",
    "threshold", "pixel_threshold"}.

    neighbours: (B, k, D) the stored vectors that conditioned each image (hits: their records);
    sources: the (database, weight) pairs it retrieved from, searched for each output's nearest item.
    """
    if not len(images):
        return []
    vectors = embedder.encode_images(list(images))  # (B, D) unit vectors
    nearest_in = [(getattr(source, "name", ""), source.search(vectors, k=1)) for source, _ in sources]  # one per db
    verdicts = []
    for b, image in enumerate(images):
        candidates = []  # (similarity, record)
        if neighbours is not None and neighbours.shape[1]:
            sims = neighbours[b] @ vectors[b]
            candidates += [(float(s), h) for s, h in zip(sims, hits[b]) if np.isfinite(s)]
        for name, result in nearest_in:
            found = result.hits(b)
            if found:
                candidates.append((float(result.scores[b, 0]), {"database": name, **found[0]}))
        if not candidates:
            verdicts.append({"flagged": False, "similarity": None, "nearest": None, "pixel_distance": None,
                             "threshold": guard.threshold, "pixel_threshold": guard.pixel_threshold})
            continue
        similarity, nearest = max(candidates, key=lambda c: c[0])
        item = _item_image(nearest)
        distance = None if item is None else pixel_distance(image, item)
        flagged = similarity >= guard.threshold or (distance is not None and distance <= guard.pixel_threshold)
        label = {k: nearest[k] for k in ("database", "id", "ref") if nearest.get(k) is not None}
        if "ref" in label:
            label["ref"] = str(label["ref"]).replace("\\", "/").rsplit("/", 1)[-1]  # a name, never a path
        verdicts.append({"flagged": bool(flagged), "similarity": round(similarity, 6), "nearest": label,
                         "pixel_distance": None if distance is None else round(distance, 6),
                         "threshold": guard.threshold, "pixel_threshold": guard.pixel_threshold})
    return verdicts


__all__ = ["CopyGuard", "DEFAULT_THRESHOLD", "PIXEL_THRESHOLD", "check", "pixel_distance"]
