"""Image -> the embedder's input pixels, light enough for decoding worker processes.

Decoding workers are spawned (faiss and torch threads hang in forked children), and a spawned worker
that imports torch, torchvision and open_clip takes ~2-5 s to start, as long as embedding hundreds of
images on a small CPU. This module imports only PIL and numpy. For open_clip's usual square
preprocessing ('shortest': resize the short side, centre crop; 'squash': resize both sides) it does
the same PIL calls as torchvision's Resize and CenterCrop (tests assert identical pixels); other
modes carry open_clip's own torchvision ops (workers then import torch).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from .decode import DEFAULT_MAX_ASPECT, DecodeOptions, SkipPayload, Undecodable, crop_aspect, decode_with_size

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_short_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision.transforms.functional.resize(img, size: int) for PIL: short side -> size, long truncated."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.functional.center_crop for PIL, on an image at least size x size."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class PixelTransform:
    """Picklable PIL image -> uint8 (H, W, 3) array: the embedder's resize and crop, nothing else.

    With 'shortest' resizing only the central square survives the centre crop, so over-long images
    are first cut to DEFAULT_MAX_ASPECT around the centre: the same pixels come out, but a 1x20000
    strip no longer becomes a 224x4,480,000 intermediate (3.5 GB).
    """

    def __init__(self, size: int, resize_mode: str = "shortest", interpolation: str = "bicubic",
                 fallback_ops: Any = None):
        self.size = size  # square output side
        self.resize_mode = resize_mode  # open_clip's resize_mode
        self.interpolation = interpolation  # 'bicubic' or 'bilinear'
        self.fallback_ops = fallback_ops  # open_clip's PIL ops, only for modes implemented here

    def load(self, source, options: DecodeOptions = DecodeOptions()) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode (JPEGs at >= 2x the model's size, via libjpeg's DCT scaling) and transform; raise Undecodable.

        Every path into the embedder — database builds and image queries alike — goes through here,
        so an image always gets the same pixels.
        """
        image, size = decode_with_size(source, replace(options, draft_size=options.draft_size or 2 * self.size))
        return self(image), size

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.fallback_ops is not None:
            out = self.fallback_ops(image)
        elif self.resize_mode == "squash":
            out = image.resize((self.size, self.size), RESAMPLE[self.interpolation])
        else:
            image = crop_aspect(image, DEFAULT_MAX_ASPECT)
            out = centre_crop(resize_short_side(image, self.size, RESAMPLE[self.interpolation]), self.size)
        return np.asarray(out.convert("RGB") if out.mode != "RGB" else out, dtype=np.uint8)


# -- decoding workers (spawned processes) -------------------------------------------------------
_WORKER: dict[str, Any] = {}


def init_worker(transform: PixelTransform, options: DecodeOptions) -> None:
    """Process initializer: remember the transform; keep numeric libraries to one thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["transform"], _WORKER["options"] = transform, options


def decode_one(payload, transform: PixelTransform, options: DecodeOptions):
    """payload -> (uint8 pixels, width, height) or raise Undecodable."""
    if payload is None:
        raise Undecodable("missing", "no image in this row")
    if isinstance(payload, SkipPayload):
        raise Undecodable(payload.reason, payload.detail)
    pixels, (width, height) = transform.load(payload, options)
    return pixels, width, height


def decode_batch(payloads: list, transform: PixelTransform | None = None, options: DecodeOptions | None = None):
    """Decode a batch; never raises for a bad image: [(pixels, w, h) or (None, reason, detail)]."""
    transform = transform or _WORKER["transform"]
    options = options or _WORKER["options"]
    out = []
    for payload in payloads:
        try:
            out.append(decode_one(payload, transform, options))
        except Undecodable as e:
            out.append((None, e.reason, e.detail))
        except Exception as e:  # a decoder bug must not kill the build: count it, list it
            out.append((None, "truncated", f"{type(e).__name__}: {e}"))
    return out
