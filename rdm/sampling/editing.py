"""The inputs of image editing: an init image to restyle, a mask to inpaint, a canvas to outpaint.

Everything here happens in pixels, before the pipeline: the user's image is decoded as database
builds decode (rdm.images.decode: EXIF, 16-bit, transparency, decompression bombs), fitted to the model's
size with its aspect kept (sides multiples of what the U-Net needs), and the mask is read, resized to
the image, checked (an empty mask changes nothing, a full one is text-to-image) and optionally
feathered inward, so that the pixels outside the mask are the input's own after paste-back.

    edit = prepare_edit("photo.jpg", mask="mask.png", strength=0.8, resolution=64, multiple=8)
    edit.image, edit.mask, edit.notes, edit.record()

Outpainting is inpainting on a larger canvas: `--extend LEFT,TOP,RIGHT,BOTTOM` pixels (of the input)
or `--aspect W:H`; the new border is edge-padded and is the mask.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import RDMError
from ..images.decode import DecodeOptions, ImageInput, Undecodable, decode_image

DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image default
MAX_EXTEND = 4.0  # the canvas may grow to at most this many times the input along each side


@dataclass
class Edit:
    """A prepared edit: the working image (what is encoded), the mask at its size (1 = change), and records."""

    image: Image.Image  # RGB, the working size (multiples of the U-Net's factor)
    strength: float
    mask: np.ndarray | None = None  # (H, W) float32 in [0, 1] at the working size; None: the whole image
    hard_mask: np.ndarray | None = None  # (H, W) bool: where anything may change (the mask before feathering)
    feather: float = 0.0
    extend: tuple[int, int, int, int] | None = None  # outpainting, in working pixels
    source: dict = field(default_factory=dict)  # the input: label, sha256, original size
    mask_source: dict | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """For the provenance: the input's digest and size, strength, mask digest and coverage, outpainting."""
        out = {"init_image": self.source, "strength": self.strength,
               "size": {"width": self.image.width, "height": self.image.height}}
        if self.mask is not None:
            out["mask"] = {**(self.mask_source or {}), "coverage": round(float(self.hard_mask.mean()), 4),
                           "feather": self.feather}
        if self.extend is not None:
            out["extend"] = dict(zip(("left", "top", "right", "bottom"), self.extend))
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def digest(source: ImageInput) -> dict:
    """Label and sha256 of an input as given (file bytes, bytes, or a PIL image's pixels); never a server path."""
    if isinstance(source, Image.Image):
        data, label = source.tobytes(), Path(getattr(source, "filename", "") or "image").name
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), "upload"
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise RDMError(f"cannot read image {source}: {e.strerror or e}") from None
        label = Path(source).name
    return {"name": label, "sha256": hashlib.sha256(data).hexdigest()}


def load_image(source: ImageInput, what: str = "init image") -> Image.Image:
    """Any image input -> RGB PIL (decoded as database builds decode), or a clear RDMError."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        raise RDMError(f"{what} {source} is a folder, not an image")
    try:
        return decode_image(source, DecodeOptions())
    except Undecodable as e:
        label = source if isinstance(source, (str, os.PathLike)) else "the uploaded file"
        raise RDMError(f"cannot read {what} {label}: {e.reason}{' (' + e.detail + ')' if e.detail else ''}; "
                       "give a PNG, JPEG, WebP, BMP, GIF or TIFF image") from None


def check_strength(strength: float) -> float:
    strength = float(strength)
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise RDMError(f"strength must be in [0, 1] (0 returns the input, 1 ignores it), got {strength}")
    return strength


def working_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(w, h) with the input's aspect, the longer side at most the model's resolution, each a multiple."""
    scale = resolution / max(width, height)
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def parse_extend(text: str | tuple | list | None) -> tuple[int, int, int, int] | None:
    """'LEFT,TOP,RIGHT,BOTTOM' pixels or a 4-sequence (one number: all four sides) -> a tuple, or None."""
    if text is None or text == "":
        return None
    parts = [str(p).strip() for p in text] if isinstance(text, (list, tuple)) else [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        parts *= 4
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0 or sum(values) == 0:
        raise RDMError(f"extend must be LEFT,TOP,RIGHT,BOTTOM pixels >= 0, not all 0 (e.g. 0,0,128,0), got {text!r}")
    return values  # type: ignore[return-value]


def parse_aspect(text: str | None) -> float | None:
    """'W:H' (e.g. 16:9) -> W / H, or None."""
    if text is None or text == "":
        return None
    try:
        w, h = (float(p) for p in str(text).split(":"))
    except ValueError:
        w = h = float("nan")
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0) or not 1 / 8 <= w / h <= 8:
        raise RDMError(f"aspect must be W:H with positive numbers within 1:8 and 8:1 (e.g. 16:9), got {text!r}")
    return w / h


def aspect_extend(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The border that brings (width, height) to `aspect` by growing one dimension, split evenly."""
    if width / height < aspect:
        grow = round(height * aspect) - width
        return (grow // 2, 0, grow - grow // 2, 0)
    grow = round(width / aspect) - height
    if grow <= 0:
        raise RDMError(f"the image is already {width}:{height}; give a different --aspect")
    return (0, grow // 2, 0, grow - grow // 2)


def load_mask(source: ImageInput, size: tuple[int, int], notes: list[str]) -> np.ndarray:
    """A mask image (white or opaque = change; its alpha is used when it has one) -> (H, W) bool at `size`."""
    if isinstance(source, np.ndarray):
        arr = np.asarray(source, np.float32)
        if arr.ndim != 2:
            raise RDMError(f"a mask array must be (H, W), got shape {arr.shape}")
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "L")
    else:
        try:
            raw = source if isinstance(source, Image.Image) else Image.open(
                io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source)
            raw.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            label = source if isinstance(source, (str, os.PathLike)) else "the uploaded mask"
            raise RDMError(f"cannot read mask {label}: {type(e).__name__}: {e}") from None
        if raw.width * raw.height > 100_000_000:
            raise RDMError(f"mask of {raw.width}x{raw.height} is too large")
        has_alpha = raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info
        alpha = raw.convert("RGBA").getchannel("A") if has_alpha else None
        im = alpha if alpha is not None and alpha.getextrema()[0] < 255 else raw.convert("L")
    if im.size != size:
        notes.append(f"mask resized from {im.width}x{im.height} to the image's {size[0]}x{size[1]}")
        im = im.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 255.0 >= 0.5


def feather_mask(hard: np.ndarray, radius: float) -> np.ndarray:
    """A soft mask ramping linearly from 1/r at the mask's edge to 1 at r = ceil(radius) pixels inside it; 0 outside
    always (the mean of the mask eroded 0 .. r-1 times), so nothing outside the mask ever changes."""
    m = hard.astype(np.float32)
    steps = int(math.ceil(radius))
    if steps <= 1:
        return m
    eroded, total = Image.fromarray(hard.astype(np.uint8) * 255, "L"), m.copy()
    for _ in range(steps - 1):
        eroded = eroded.filter(ImageFilter.MinFilter(3))
        total += np.asarray(eroded, np.float32) / 255.0
    return (total / steps).astype(np.float32)


def prepare_edit(init_image: ImageInput, strength: float | None = None, mask: ImageInput | np.ndarray | None = None,
                 feather: float = 0.0, extend: tuple[int, int, int, int] | str | None = None,
                 aspect: float | str | None = None, resolution: int = 512, multiple: int = 8,
                 size: tuple[int, int] | None = None) -> Edit:
    """Read and fit the init image (and mask, or outpainting border) to the working size; check everything.

    size: (width, height) to use instead of fitting to `resolution` (the input is resized to it).
    Outpainting (extend or aspect) makes its border the mask (added to a given mask) and defaults strength to 1.
    """
    extend = parse_extend(extend)
    aspect = parse_aspect(aspect) if isinstance(aspect, str) else aspect
    if extend is not None and aspect is not None:
        raise RDMError("give --extend or --aspect, not both")
    outpaint = extend is not None or aspect is not None
    strength = check_strength(1.0 if strength is None and outpaint else
                              DEFAULT_STRENGTH if strength is None else strength)
    if feather < 0 or not math.isfinite(feather):
        raise RDMError(f"mask feather must be >= 0 pixels, got {feather}")
    source = digest(init_image)
    image = load_image(init_image)
    source["size"] = {"width": image.width, "height": image.height}
    notes: list[str] = []
    hard = None
    if mask is not None:
        hard = load_mask(mask, image.size, notes)
        source_mask = {"sha256": hashlib.sha256(np.packbits(hard).tobytes()).hexdigest()}
        if isinstance(mask, (str, os.PathLike)):
            source_mask["name"] = Path(mask).name
    else:
        source_mask = None

    # outpainting: a larger canvas, the input edge-padded into the border, the border masked
    if outpaint:
        if aspect is not None:
            extend = aspect_extend(image.width, image.height, aspect)
        left, top, right, bottom = extend
        if max((left + right) / image.width, (top + bottom) / image.height) > MAX_EXTEND:
            raise RDMError(f"extend {extend} grows the {image.width}x{image.height} image more than {MAX_EXTEND:g}x "
                           "along a side; extend in several steps")
        arr = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
        border = np.ones(arr.shape[:2], bool)
        border[top:top + image.height, left:left + image.width] = False if hard is None else \
            hard  # the given mask still applies inside the original
        image, hard = Image.fromarray(arr, "RGB"), border

    # fit to the working size (aspect kept, or the size asked for)
    w, h = size if size is not None else working_size(image.width, image.height, resolution, multiple)
    if (w, h) != image.size:
        factor = w / image.width
        if size is None and (image.width > resolution or image.height > resolution):
            notes.append(f"input resized from {image.width}x{image.height} to {w}x{h} (the model's size is "
                         f"{resolution}; aspect kept)")
        elif size is None:
            notes.append(f"input resized from {image.width}x{image.height} to {w}x{h}")
        image = image.resize((w, h), Image.Resampling.LANCZOS if factor < 1 else Image.Resampling.BICUBIC)
        if hard is not None:
            hard = np.asarray(Image.fromarray(hard.astype(np.uint8) * 255, "L").resize(
                (w, h), Image.Resampling.BILINEAR), np.float32) / 255.0 >= 0.5
    if extend is not None:  # recorded in working pixels
        scale = w / (source["size"]["width"] + extend[0] + extend[2])
        extend = tuple(int(round(v * scale)) for v in extend)

    soft = None
    if hard is not None:
        coverage = float(hard.mean())
        if coverage == 0.0:
            raise RDMError("the mask is empty (nothing is white/opaque): nothing would change; paint the region to "
                           "redraw in white")
        if coverage == 1.0 and not outpaint:
            notes.append("the mask covers the whole image: this is image-to-image without a mask")
            hard = None
        else:
            soft = feather_mask(hard, feather)
    return Edit(image=image, strength=strength, mask=soft, hard_mask=hard, feather=float(feather),
                extend=extend, source=source, mask_source=source_mask if mask is not None else None, notes=notes)
