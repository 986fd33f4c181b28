"""Toy art: a deterministic, captioned image set in which content (shape, colour) and style are separate factors.

Every item is a pure function of (spec, index): its labels come from RNG streams seeded by
(seed, index, stream), so any item can be rebuilt alone, in any order, and restricting a set to one
style keeps each index's shape, colour, placement and caption choices. `generate` writes the layout
that HF `datasets.load_dataset("imagefolder", data_dir=...)` reads: images in `<style>/` folders and
one `metadata.jsonl` at the root whose `file_name` column is relative to that root.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import RDMError
from ..util.files import atomic_write

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond")
COLOURS = {  # name -> RGB; hues at least 20 degrees apart, so mixing with any grey keeps them apart
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (40, 165, 60),
    "cyan": (20, 185, 200),
    "blue": (40, 85, 225),
    "purple": (140, 60, 200),
    "pink": (235, 80, 170),
}
STYLES = ("flat", "outline", "mosaic", "dotted", "striped", "neon")  # the styles the bundled demo model learned
# Styles the bundled model never saw: what an adapter (rdm train --adapter) is shown teaching it. They are drawable
# (rdm toyart --styles cutout) but left out of every default set, so the demo model's data and figures keep to STYLES.
NEW_STYLES = ("cutout",)
ALL_STYLES = STYLES + NEW_STYLES
STYLE_TEMPLATES = (
    "{content}, {style} style",
    "{content} in {style} style",
    "{content}, drawn in {style} style",
    "{style} style: {content}",
)
METADATA_FILE = "metadata.jsonl"

SCALE_RANGE = (0.19, 0.33)  # shape radius as a fraction of the image side
MARGIN = 0.05  # free border (fraction of the side) kept around the shape's box
MAX_ROTATION = 20.0  # degrees either way; more would turn a square into a diamond
LIGHT_BG = 0.96  # grey level behind flat, outline, dotted and striped shapes
DARK_BG = 0.07  # grey level behind neon shapes
MOSAIC_TILES = 16  # mosaic tiles per side, whatever the image size
_CONTENT, _STYLE, _CAPTION, _RENDER = range(4)  # independent RNG streams of one item

DEFAULT_COUNT = 240  # `rdm toyart`: images drawn


@dataclass(frozen=True)
class ToyArtSpec:
    """What a toy-art set contains and how it is drawn; item i is a pure function of (spec, i)."""

    size: int = 64  # output side in pixels (square images)
    shapes: tuple[str, ...] = SHAPES  # shapes drawn from, names in SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)  # colours drawn from, names in COLOURS
    styles: tuple[str, ...] = STYLES  # styles drawn from, names in STYLES
    style_caption_prob: float = 0.5  # chance that a caption names the style
    detail_prob: float = 0.3  # chance, for size and for position each, that a caption names it
    seed: int = 0  # item i draws from numpy.random.default_rng([seed, i, stream])
    supersample: int = 4  # draw at size * supersample, then downscale with LANCZOS

    def __post_init__(self):
        for name, allowed in (("shapes", SHAPES), ("colours", tuple(COLOURS)), ("styles", ALL_STYLES)):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            _check_choices(name, getattr(self, name), allowed)
        for name in ("style_caption_prob", "detail_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RDMError(f"ToyArtSpec.{name} must be a probability in [0, 1], got {getattr(self, name)}.")
        if self.size < 16:
            raise RDMError(f"ToyArtSpec.size must be at least 16 pixels, got {self.size}.")
        if self.supersample < 1:
            raise RDMError(f"ToyArtSpec.supersample must be 1 or more, got {self.supersample}.")


# ---------------------------------------------------------------- geometry


def _regular(n: int, radius: float = 1.0, phase: float = -90.0) -> np.ndarray:
    """Vertices of a regular n-gon, first vertex at `phase` degrees (-90 = straight up)."""
    t = np.radians(phase + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    """A star with alternating outer (1) and inner radii, one point straight up."""
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points) * radii[:, None]


def _heart(n: int = 64) -> np.ndarray:
    """The classic parametric heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - ...), point down."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)


def _cross(arm: float = 0.32) -> np.ndarray:
    """A plus sign whose arms are 2 * arm wide."""
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                     (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=float)


def _normalised(points: np.ndarray, extent: float = 1.0) -> np.ndarray:
    """Centre a polygon on its bounding box and scale it so its larger half-extent is `extent`."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) * (2 * extent / (hi - lo).max())


UNIT_SHAPES = {  # shape -> (K, 2) polygon inside [-1, 1]^2, y pointing down as on screen
    "circle": _normalised(_regular(96)),
    "square": _normalised(_regular(4, phase=-45.0), 0.84),
    "triangle": _normalised(_regular(3)),
    "star": _normalised(_star()),
    "heart": _normalised(_heart()),
    "cross": _normalised(_cross()),
    "hexagon": _normalised(_regular(6)),
    "diamond": _normalised(np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], dtype=float)),
}


def shape_points(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """The polygon of `shape` centred at (cx, cy), `radius` pixels, turned `rotation` degrees clockwise."""
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    points = UNIT_SHAPES[shape] @ np.array([[c, s], [-s, c]]) * radius + (cx, cy)
    return [tuple(p) for p in points.tolist()]


def fill_mask(points: list, side: int) -> np.ndarray:
    """Coverage (side, side) in {0, 1} of the filled polygon."""
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _line_mask(points: list, side: int, width: float) -> np.ndarray:
    """Coverage (side, side) in {0, 1} of the closed polygon's outline, `width` pixels thick."""
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).line(points + points[:2], fill=255, width=max(1, round(width)), joint="curve")
    return np.asarray(mask, dtype=np.float32) / 255.0


@lru_cache(maxsize=8)
def _stripes(side: int, period: float) -> np.ndarray:
    """Diagonal stripes (side, side) in {0, 1}, running along x + y = const, half of each period on."""
    x = np.arange(side, dtype=np.float32) + 0.5
    stripes = (((x[None, :] + x[:, None]) % period) < period / 2).astype(np.float32)
    stripes.flags.writeable = False
    return stripes


@lru_cache(maxsize=8)
def _dots(side: int, period: float, radius: float) -> np.ndarray:
    """A square grid of round dots (side, side) in {0, 1}, one per period."""
    d = (np.arange(side, dtype=np.float32) + 0.5) % period - period / 2
    dots = (d[None, :] ** 2 + d[:, None] ** 2 <= radius**2).astype(np.float32)
    dots.flags.writeable = False
    return dots


def _downscale(alpha: np.ndarray, size: int) -> np.ndarray:
    """Coverage (side, side) -> (size, size) with LANCZOS, clipped to [0, 1]."""
    if alpha.shape[0] == size:
        return alpha
    image = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))  # mode "F"
    small = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(small), 0.0, 1.0)


def _paint(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite `colour` over `canvas` (h, w, 3) with per-pixel coverage `alpha` (h, w)."""
    a = alpha[..., None]
    return canvas * (1.0 - a) + colour * a


def _plain(level: float) -> np.ndarray:
    """A uniform grey background (1, 1, 3)."""
    return np.full((1, 1, 3), level, dtype=np.float32)


# ---------------------------------------------------------------- styles
# A painter returns (background, layers): a background (h, w, 3) at any resolution, scaled up with
# NEAREST, and (colour, coverage) layers drawn at `side` = size * supersample, each composited over
# it after LANCZOS downscaling. Compositing is linear in coverage, so this equals drawing in colour
# at `side` and downscaling the picture, at a fraction of the cost.


def paint_flat(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """Solid fill on a light background."""
    return _plain(LIGHT_BG), [(rgb, fill_mask(points, side))]


def paint_outline(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """A thick outline only, on a light background."""
    return _plain(LIGHT_BG), [(rgb, _line_mask(points, side, 0.075 * side))]


def paint_mosaic(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """Square tiles (MOSAIC_TILES per side) of grey or colour mixed by coverage, each lighter or darker."""
    n = MOSAIC_TILES
    coverage = Image.fromarray(fill_mask(points, side)).resize((n, n), Image.Resampling.BOX)
    shade = rng.uniform(0.8, 1.0, size=(n, n, 1)).astype(np.float32)
    grey = rng.uniform(0.8, 0.92, size=(n, n, 1)).astype(np.float32)
    return _paint(grey, rgb * shade, np.asarray(coverage)), []


def paint_dotted(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """A thin outline filled with polka dots on a light background."""
    dots = fill_mask(points, side) * _dots(side, side / 11.0, 0.3 * side / 11.0)
    return _plain(LIGHT_BG), [(rgb, np.maximum(dots, _line_mask(points, side, 0.03 * side)))]


def paint_striped(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """Diagonal stripes over a pale tint of the colour, with a thin outline, on a light background."""
    fill = fill_mask(points, side)
    stripes = np.maximum(fill * _stripes(side, side / 8.0), _line_mask(points, side, 0.03 * side))
    return _plain(LIGHT_BG), [(0.2 * rgb + 0.8, fill), (rgb, stripes)]


def paint_neon(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """A glowing outline (blurred halo, pale core) on a dark background."""
    line = _line_mask(points, side, 0.035 * side)
    halo = Image.fromarray(np.uint8(line * 255)).filter(ImageFilter.GaussianBlur(0.04 * side))
    glow = np.clip(np.asarray(halo, dtype=np.float32) * (2.0 / 255.0), 0.0, 0.9)
    return _plain(DARK_BG), [(rgb, glow), (0.5 * rgb + 0.5, line)]


CUTOUT_PAPER = (0.98, 0.96, 0.90)  # cutout: the cream paper's RGB
CUTOUT_GROUND = 0.85  # cutout: the ground is the colour times this


def paint_cutout(points: list, side: int, rgb: np.ndarray, rng: np.random.Generator) -> tuple:
    """A paper cut-out: the shape in cream paper with a soft shadow, on a ground of the colour (inverted figure and
    ground: none of the six learned styles puts the colour behind the shape)."""
    fill = fill_mask(points, side)
    offset = int(round(0.035 * side))
    shadow = np.zeros_like(fill)
    shadow[offset:, offset:] = fill[:-offset, :-offset]
    soft = Image.fromarray(np.uint8(shadow * 255)).filter(ImageFilter.GaussianBlur(0.02 * side))
    shade = np.asarray(soft, dtype=np.float32) * (0.45 / 255.0)
    return (CUTOUT_GROUND * rgb)[None, None, :], [(np.zeros(3, np.float32), shade),
                                                  (np.float32(CUTOUT_PAPER), fill)]


PAINTERS = {  # style -> painter(points, side, rgb, rng) -> (background, [(colour, coverage), ...])
    "flat": paint_flat,
    "outline": paint_outline,
    "mosaic": paint_mosaic,
    "dotted": paint_dotted,
    "striped": paint_striped,
    "neon": paint_neon,
    "cutout": paint_cutout,
}


def render(
    shape: str,
    colour: str,
    style: str,
    size: int = 64,
    *,
    x: float = 0.5,
    y: float = 0.5,
    scale: float = 0.26,
    rotation: float = 0.0,
    rng: np.random.Generator | None = None,
    supersample: int = 4,
) -> Image.Image:
    """Draw one RGB image from its labels; x, y, scale are fractions of the side, rotation is degrees clockwise."""
    _check_choices("shape", (shape,), SHAPES)
    _check_choices("colour", (colour,), tuple(COLOURS))
    _check_choices("style", (style,), ALL_STYLES)
    rng = np.random.default_rng(0) if rng is None else rng
    side = size * supersample
    points = shape_points(shape, x * side, y * side, scale * side, rotation)
    rgb = np.asarray(COLOURS[colour], dtype=np.float32) / 255.0
    background, layers = PAINTERS[style](points, side, rgb, rng)
    rows = np.arange(size) * background.shape[0] // size  # NEAREST upscaling, (size,)
    canvas = background[rows][:, rows]  # (size, size, 3)
    for layer_colour, coverage in layers:
        canvas = _paint(canvas, layer_colour, _downscale(coverage, size))
    return Image.fromarray(np.uint8(np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5))


# ---------------------------------------------------------------- captions and labels


def size_word(scale: float) -> str:
    """'small', 'medium' or 'large' for a shape radius given as a fraction of the side."""
    return "small" if scale < 0.23 else "large" if scale > 0.29 else "medium"


def place_words(x: float, y: float) -> str | None:
    """Where the shape sits ('on the left', 'at the top', ...), or None when it is near the centre."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return None
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def make_caption(
    shape: str, colour: str, style: str | None = None, *, size: str | None = None, place: str | None = None,
    template: str = STYLE_TEMPLATES[0],
) -> str:
    """'a small red star on the left' plus, when `style` is given, the style through `template`."""
    words = " ".join(w for w in (size if size != "medium" else None, colour, shape) if w)
    content = ("an " if words[0] in "aeiou" else "a ") + words + (f" {place}" if place else "")
    return template.format(content=content, style=style) if style else content


def _item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The RNG of one stream of one item; independent of every other item."""
    return np.random.default_rng([seed, index, stream])


def sample_labels(spec: ToyArtSpec, index: int) -> dict:
    """The labels (content, style, placement, caption) of item `index`, without drawing it."""
    index = int(index)
    if index < 0:
        raise RDMError(f"Toy-art indices start at 0, got {index}.")
    content = _item_rng(spec.seed, index, _CONTENT)
    shape = spec.shapes[content.integers(len(spec.shapes))]
    colour = spec.colours[content.integers(len(spec.colours))]
    scale = round(float(content.uniform(*SCALE_RANGE)), 4)
    lo, hi = scale + MARGIN, 1.0 - scale - MARGIN
    x, y = (round(float(v), 4) for v in content.uniform(lo, hi, size=2))
    rotation = round(float(content.uniform(-MAX_ROTATION, MAX_ROTATION)), 2)
    style = spec.styles[_item_rng(spec.seed, index, _STYLE).integers(len(spec.styles))]
    words = _item_rng(spec.seed, index, _CAPTION)
    named, with_size, with_place = words.random(3) < (spec.style_caption_prob, spec.detail_prob, spec.detail_prob)
    template = STYLE_TEMPLATES[words.integers(len(STYLE_TEMPLATES))]
    caption = make_caption(
        shape, colour, style if named else None, size=size_word(scale) if with_size else None,
        place=place_words(x, y) if with_place else None, template=template,
    )
    return {
        "index": index, "caption": caption, "shape": shape, "colour": colour, "style": style,
        "size": size_word(scale), "scale": scale, "x": x, "y": y, "rotation": rotation,
        "style_in_caption": bool(named), "image_size": spec.size,
    }


def sample_item(spec: ToyArtSpec, index: int) -> tuple[Image.Image, dict]:
    """Item `index` of the set: its image and its labels; the same (spec, index) gives the same pixels."""
    labels = sample_labels(spec, index)
    image = render(
        labels["shape"], labels["colour"], labels["style"], spec.size, x=labels["x"], y=labels["y"],
        scale=labels["scale"], rotation=labels["rotation"], rng=_item_rng(spec.seed, index, _RENDER),
        supersample=spec.supersample,
    )
    return image, labels


def generate(
    spec: ToyArtSpec, n: int, out_dir: str | Path, styles: tuple[str, ...] | list[str] | None = None, *,
    start: int = 0, overwrite: bool = False,
) -> Path:
    """Write items start..start+n-1 as out_dir/<style>/<index:06d>.png plus out_dir/metadata.jsonl.

    `styles` restricts the set (one style -> a per-style database); an index keeps its content
    whatever the styles. metadata.jsonl is written last, atomically, and is the only metadata file,
    since HF imagefolder refuses a folder holding metadata files of two formats. `overwrite` rewrites
    the files this call makes and leaves any others in place.
    """
    if n < 0:
        raise RDMError(f"generate needs a count n >= 0, got {n}.")
    if styles is not None:
        spec = replace(spec, styles=tuple(styles))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise RDMError(f"{out_dir} is not empty; choose an empty folder or pass overwrite=True.")
    out_dir.mkdir(parents=True, exist_ok=True)

    def draw(rows) -> None:  # the images, then metadata.jsonl lands whole: its presence means a finished set
        for index in range(start, start + n):
            image, labels = sample_item(spec, index)
            file_name = f"{labels['style']}/{index:06d}.png"
            (out_dir / labels["style"]).mkdir(exist_ok=True)
            image.save(out_dir / file_name)
            rows.write((json.dumps({"file_name": file_name, **labels}) + "\n").encode())

    atomic_write(out_dir / METADATA_FILE, draw)
    return out_dir


def read_metadata(out_dir: str | Path) -> list[dict]:
    """The rows of a generated set's metadata.jsonl, in index order."""
    with (Path(out_dir) / METADATA_FILE).open(encoding="utf-8") as rows:
        return [json.loads(line) for line in rows if line.strip()]


def _check_choices(what: str, names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """Raise if `names` is empty or holds a name outside `allowed`, listing the valid ones."""
    if not names:
        raise RDMError(f"Toy art needs at least one {what}; choose from {', '.join(allowed)}.")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        listed = ", ".join(map(str, unknown))
        raise RDMError(f"Unknown toy-art {what}: {listed}; choose from {', '.join(allowed)}.")
