"""Contact sheets and labelled grids: where a person would rather look than read JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .decode import Undecodable, decode_image

THUMB = 128
PAD = 6
LABEL_H = 28
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (225, 225, 225)


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def thumbnail(image: Image.Image | str | None, size: int = THUMB) -> Image.Image:
    """A square thumbnail (letterboxed) of an image or a path; a grey tile when it can't be read."""
    if isinstance(image, str):
        try:
            image = decode_image(image)
        except Undecodable:
            image = None
    tile = Image.new("RGB", (size, size), PLACEHOLDER if image is None else BACKGROUND)
    if image is not None:
        im = image.convert("RGB")
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """Shorten text with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid(rows: Sequence[Sequence[tuple[Image.Image | str | None, str]]], row_labels: Sequence[str] = (),
         title: str = "", size: int = THUMB, label_width: int = 0) -> Image.Image:
    """A grid of (image or path, caption) tiles, one row per sequence, with optional row labels and a title."""
    cols = max((len(r) for r in rows), default=0)
    label_w = label_width or (160 if row_labels else 0)
    title_h = 30 if title else 0
    cell_w, cell_h = size + PAD, size + LABEL_H + PAD
    sheet = Image.new("RGB", (label_w + PAD + cols * cell_w, title_h + PAD + len(rows) * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, big = _font(11), _font(16)
    if title:
        draw.text((PAD, 6), _fit(draw, title, sheet.width - 2 * PAD, big), fill=(0, 0, 0), font=big)
    for r, row in enumerate(rows):
        y = title_h + PAD + r * cell_h
        if r < len(row_labels):
            for i, line in enumerate(str(row_labels[r]).split("\n")[:6]):
                draw.text((PAD, y + 4 + 16 * i), _fit(draw, line, label_w - 2 * PAD, font), fill=(0, 0, 0), font=font)
        for c, (image, caption) in enumerate(row):
            x = label_w + PAD + c * cell_w
            sheet.paste(thumbnail(image, size), (x, y))
            for i, line in enumerate(str(caption).split("\n")[:2]):
                draw.text((x, y + size + 2 + 12 * i), _fit(draw, line, size, font), fill=(40, 40, 40), font=font)
    return sheet


def search_sheet(queries: Sequence[str], hits: Sequence[Sequence[dict]], out: str | Path,
                 title: str = "") -> Path:
    """Contact sheet of search results: a row per query (image queries first show themselves), its hits."""
    rows = []
    for label, qh in zip(queries, hits):
        query_tile = [(label.removeprefix("image: "), "query")] if label.startswith("image: ") else []
        rows.append(query_tile + [(h.get("path"), f"{h['score']:.3f}\n{h['id']}") for h in qh])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, row_labels=list(queries), title=title).save(out)
    return out
