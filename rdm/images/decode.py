"""Decoding, the same for every image: any file or bytes -> an 8-bit RGB PIL image, or a skip reason.

Every source (folder, Hugging Face dataset) goes through `decode_image`, so an image embeds the
same whichever way it arrived. Rules, in order:
  1. refuse decompression bombs (more than `max_pixels`) before any pixel is decoded;
  2. first frame of animations;
  3. EXIF orientation applied;
  4. 16-bit, 32-bit and float images scaled to 8 bits (not saturated);
  5. transparency composited onto white; palette, CMYK, grayscale -> RGB;
  6. optionally, extreme aspect ratios cropped around the centre (`crop_aspect`), so that a
     shortest-side resize never allocates gigabytes (open_clip's Resize on a 1x20000 image costs
     3.5 GB); the embedder's PixelTransform applies it whenever its resize keeps only the centre.
Failures raise `Undecodable` with a short machine-readable reason; callers count and list them.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: above this an image is refused as a decompression bomb
DEFAULT_MAX_ASPECT = 2.0  # longest/shortest side kept around the centre before a shortest-side resize

ImageInput = Union[str, os.PathLike, bytes, Image.Image]


class Undecodable(Exception):
    """An image that cannot be decoded; `reason` is one of the SKIP_REASONS keys."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipPayload(NamedTuple):
    """What a source gives instead of image bytes when it already knows the item cannot be embedded
    (a truncated tar member, a failed download): decoding turns it into this skip record."""

    reason: str  # one of the SKIP_REASONS keys
    detail: str


SKIP_REASONS = {
    "missing": "file does not exist (dangling link or deleted)",
    "empty": "file is empty",
    "not-an-image": "not an image format PIL recognises (e.g. HTML saved as .png)",
    "truncated": "image data is truncated or corrupt",
    "decompression-bomb": "more pixels than the limit (a possible decompression bomb)",
    "degenerate": "image has a zero-sized side",
    "unreadable": "file could not be read (permissions, I/O error)",
    "outside-source": "a link to a file outside the source folder (not followed)",
}


@dataclass(frozen=True)
class DecodeOptions:
    """How images are normalised before the embedder's own preprocessing."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse images with more pixels than this
    max_aspect: float | None = None  # centre-crop the longer side to this ratio (see crop_aspect); None keeps all
    draft_size: int | None = None  # JPEG only: let libjpeg decode at >= this shortest side (faster)


def _open(source: ImageInput) -> Image.Image:
    """Open lazily (header only) from a path, bytes or an already open image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise Undecodable("empty")
        return Image.open(io.BytesIO(bytes(source)))
    path = Path(source)
    if not path.exists():
        raise Undecodable("missing", str(path))
    try:
        if path.stat().st_size == 0:
            raise Undecodable("empty", str(path))
        return Image.open(path)
    except PermissionError as e:
        raise Undecodable("unreadable", str(e)) from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float images to 8 bits by range, never by clipping."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # rint(a / 257) in integers, in place: (2a + 257) // 514 is the same (a / 257 is never exactly half-way,
        # 257 being odd), at 4 bytes a pixel instead of float64's 8 several times over
        arr = np.asarray(im).astype(np.uint32)
        arr *= 2
        arr += 257
        arr //= 514
        return Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max(initial=0)
        scale = 1.0 if top <= 255 else (257.0 if top <= 65535 else (2**32 - 1) / 255.0)
        return Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.maximum(arr, 0.0)
        top = arr.max(initial=0)
        arr = arr * 255.0 if top <= 1.0 else arr * (255.0 / top)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (alpha, palette or tRNS) composited onto white."""
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def crop_aspect(im: Image.Image, max_aspect: float) -> Image.Image:
    """Keep the centre of an over-long image so that longest/shortest <= max_aspect."""
    w, h = im.size
    short = min(w, h)
    limit = int(np.ceil(short * max_aspect))
    if w > limit:
        left = (w - limit) // 2
        return im.crop((left, 0, left + limit, h))
    if h > limit:
        top = (h - limit) // 2
        return im.crop((0, top, w, top + limit))
    return im


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height


def decode_image(source: ImageInput, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Decode a path, bytes or PIL image into a normalised 8-bit RGB image; raise Undecodable."""
    return decode_with_size(source, options)[0]


def decode_with_size(source: ImageInput, options: DecodeOptions = DecodeOptions()) -> tuple[Image.Image, tuple[int, int]]:
    """decode_image, plus the upright (width, height) of the original (before any JPEG draft scaling)."""
    with undecodable_errors():
        im = open_checked(source, options)
        w, h = im.size
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        upright = (h, w) if im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS else (w, h)
        if options.draft_size and im.format == "JPEG":
            scale = min(w, h) / options.draft_size
            if scale >= 2:
                im.draft("RGB", (int(w / scale), int(h / scale)))
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(_to_8bit(im))
        if options.max_aspect is not None:
            im = crop_aspect(im, options.max_aspect)
        return im, upright


def open_checked(source: ImageInput, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Open lazily (the header only: size and mode known, no pixel decoded) and refuse bombs and empty sides (rules 1
    and 2 of the module's docstring); call inside `undecodable_errors()`."""
    im = _open(source)
    w, h = im.size
    if w * h > options.max_pixels:
        raise Undecodable("decompression-bomb", f"{w}x{h} > {options.max_pixels} pixels")
    if w == 0 or h == 0:
        raise Undecodable("degenerate", f"{w}x{h}")
    return im


@contextlib.contextmanager
def undecodable_errors():
    """PIL's many ways of failing (and its decompression-bomb warning) -> `Undecodable` with its reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except Undecodable:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Undecodable("decompression-bomb", str(e)) from None
    except UnidentifiedImageError as e:
        # PIL names a bytes source by its BytesIO's address, different in every process: keep details stable
        raise Undecodable("not-an-image", re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "image bytes", str(e))) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as e:
        # PIL reports truncated/corrupt data as OSError, SyntaxError (bad headers) or ValueError.
        if isinstance(e, FileNotFoundError):
            raise Undecodable("missing", str(e)) from None
        if isinstance(e, PermissionError):
            raise Undecodable("unreadable", str(e)) from None
        raise Undecodable("truncated", f"{type(e).__name__}: {e}") from None
    except MemoryError as e:
        raise Undecodable("decompression-bomb", f"out of memory: {e}") from None
