"""Judges that need no training on samples: a nearest-centroid style judge and the border colour.

* `CentroidJudge`: one centroid per style in the demo CLIP's own image-embedding space, the mean of
  clean toy art of that style (items the demo CLIP and the databases never saw); a sample's style is
  its nearest centroid by cosine. Nothing about the samples (their tint, blur or noise) is learned,
  so a seed-tinted background moves a sample towards whichever style has that background.
* `figure_fit`: the figure of an image with a plain ground (the pixels far from the border's colour), the
  toy-art shape whose filled polygon overlaps it best (IoU, fitted at the figure's centroid and area over
  the toy art's turns), and the mean colours of figure and ground: what a person checks of a sample of a
  filled style (flat, cutout), e.g. that a cutout adapter's "a blue heart" is a cream heart on blue.
* `border_rgb`: the mean RGB of an image's outer frame (4 pixels at 64 px). Toy art has a plain
  border (white, grey or black by style), so its distance to the database's border colour is where
  a leaky noise schedule shows: `border_error` is the mean absolute difference over R, G and B, in
  [0, 1] (the toy styles' backgrounds differ from each other by 0.30 on average in this measure).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import RDMError
from .toyart import (
    COLOURS,
    MAX_ROTATION,
    SHAPES,
    STYLES,
    ToyArtSpec,
    fill_mask,
    sample_item,
    shape_points,
)

FRAME = 1 / 16  # border width as a fraction of the side: 4 px at 64 px
CENTROID_START = 30_000_000  # toy-art index of the centroids' first item: beyond training (0..) and demo (20M..)


def _array(image) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from a PIL image or an array in [0, 1] (float) / [0, 255] (uint8)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    a = np.asarray(image)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def border_rgb(image) -> np.ndarray:
    """(3,) mean RGB of the outer frame (FRAME of the side, at least 1 px) of one image."""
    a = _array(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise RDMError(f"border_rgb takes an RGB image, got an array of shape {a.shape}")
    w = max(1, round(min(a.shape[:2]) * FRAME))
    mask = np.ones(a.shape[:2], bool)
    mask[w:-w, w:-w] = False
    return a[mask].mean(0)


def border_error(images: Sequence, reference: np.ndarray) -> np.ndarray:
    """(N,) mean absolute RGB difference between each image's border colour and `reference` (3,)."""
    return np.array([np.abs(border_rgb(im) - np.asarray(reference)).mean() for im in images])


def style_borders(images_by_style: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """{style: (3,) mean border colour} of reference images (a database's own toy art)."""
    return {style: np.mean([border_rgb(im) for im in images], 0) for style, images in images_by_style.items()}


def _figure_mask(a: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """Pixels whose colour is over half as far from the ground as the farthest 2% of them (the figure; soft
    shadows and anti-aliased edges, nearer the ground, stay out)."""
    dist = np.abs(a - ground).sum(-1)
    far = np.quantile(dist, 0.98)
    return dist > max(0.5 * far, 0.15)


@lru_cache(maxsize=64)
def _quarter_side_area(shape: str, side: int) -> int:
    """Pixels of `shape` filled at radius side / 4 (what the fitted radius scales from)."""
    return max(int((fill_mask(shape_points(shape, side / 2, side / 2, side / 4, 0.0), side) > 0.5).sum()), 1)


def _shape_iou(mask: np.ndarray, shape: str, cx: float, cy: float, area: float) -> float:
    """Best IoU of `shape`, filled, with the same area and centroid as `mask`, over the toy art's turns."""
    side = mask.shape[0]
    radius = side / 4 * math.sqrt(area / _quarter_side_area(shape, side))
    best = 0.0
    for rotation in np.linspace(-MAX_ROTATION, MAX_ROTATION, 9):
        drawn = fill_mask(shape_points(shape, cx, cy, radius, rotation), side) > 0.5
        if drawn.any():  # move it so that its centroid is the figure's (a heart's is not its box's centre)
            ys, xs = np.nonzero(drawn)
            drawn = fill_mask(shape_points(shape, 2 * cx - xs.mean() - 0.5, 2 * cy - ys.mean() - 0.5, radius,
                                           rotation), side) > 0.5
        union = (drawn | mask).sum()
        best = max(best, float((drawn & mask).sum() / union) if union else 0.0)
    return best


def figure_fit(image, shapes: Sequence[str] = SHAPES) -> dict:
    """{"shape", "iou", "ious", "figure_rgb", "ground_rgb", "figure_share"} of one image with a plain ground."""
    a = _array(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1]:
        raise RDMError(f"figure_fit takes a square RGB image, got an array of shape {a.shape}")
    ground = border_rgb(a)
    mask = _figure_mask(a, ground)
    share = float(mask.mean())
    if not mask.any():
        return {"shape": None, "iou": 0.0, "ious": {}, "figure_rgb": None, "ground_rgb": ground.tolist(),
                "figure_share": 0.0}
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    ious = {s: round(_shape_iou(mask, s, cx, cy, mask.sum()), 4) for s in shapes}
    shape = max(ious, key=ious.get)
    return {"shape": shape, "iou": ious[shape], "ious": ious, "figure_rgb": a[mask].mean(0).tolist(),
            "ground_rgb": ground.tolist(), "figure_share": share}


def nearest_colour(rgb, scale: float = 1.0) -> str:
    """The toy-art colour name nearest to `rgb` in [0, 1] (each colour times `scale`: a cutout's ground is the colour
    times toyart.CUTOUT_GROUND)."""
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32) / 255.0 * scale
    return names[int(np.abs(table - np.asarray(rgb, np.float32)).sum(1).argmin())]


def render_clean(style: str, n: int, start: int = CENTROID_START, spec: ToyArtSpec = ToyArtSpec()) -> list:
    """n clean toy-art images of one style (items start.. of spec with only that style)."""
    one = replace(spec, styles=(style,))
    return [sample_item(one, start + i)[0] for i in range(n)]


class CentroidJudge:
    """Nearest style centroid in an embedder's image space (cosine); predict(images) -> [style]."""

    def __init__(self, embedder, centroids: Mapping[str, np.ndarray]):
        if not centroids:
            raise RDMError("a centroid judge needs at least one style centroid")
        self.embedder = embedder
        self.styles = list(centroids)
        c = np.stack([np.asarray(centroids[s], np.float32) for s in self.styles])
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)

    @classmethod
    def from_toyart(cls, embedder, styles: Sequence[str] = STYLES, n_per_style: int = 200,
                    start: int = CENTROID_START, spec: ToyArtSpec = ToyArtSpec()) -> "CentroidJudge":
        """Centroids of n clean, unseen toy-art images per style, embedded with `embedder`."""
        return cls(embedder, {s: embedder.encode_images(render_clean(s, n_per_style, start, spec)).mean(0)
                              for s in styles})

    def predict(self, images: Sequence) -> list[str]:
        if not len(images):
            return []
        pil = [im if isinstance(im, Image.Image) else Image.fromarray((_array(im) * 255).round().astype(np.uint8))
               for im in images]
        v = self.embedder.encode_images(pil)
        return [self.styles[i] for i in (v @ self.centroids.T).argmax(1)]
