"""Restyling measured on the demo: unseen toy art of one style, redrawn with each other style's database.

For every input (a clean toy-art image of a source style, with its shape and colour known) and every other
style's database, image-to-image at each strength of a sweep; each output judged twice:

- *style-swap*: the nearest style centroid in the model's CLIP space (rdm.demo.blind.CentroidJudge) is the
  target database's style;
- *content kept*: the toy-art judge (rdm.demo.classifier) sees the input's shape and colour.

Used by scripts/eval_restyle.py (the README's figures) and notebooks/style_comparison.ipynb (the chart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image, ImageDraw

from ..errors import RDMError
from .toyart import ToyArtSpec, make_caption, sample_item

RESTYLE_START = 76_000_000  # toy-art index of the first input: beyond training (0..), the demo (20M..), centroids (30M..)
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class RestyleConfig:
    """Which restyles the measurement draws."""

    strengths: tuple[float, ...] = STRENGTHS
    inputs_per_style: int = 3  # unseen toy-art inputs of each source style
    start: int = RESTYLE_START  # their first toy-art index
    prompt: bool = False  # query by the input's caption (True) or, as `rdm sample --init-image` alone, by the image
    seed: int = 0  # restyle j of input i is drawn with seed + 1000 * i + j
    steps: int | None = None  # denoising steps (None: the model's own)
    scheduler: str | None = None  # the sampler (None: the model's own)
    guidance: float | None = None  # guidance scale (None: the model's own)

    def __post_init__(self):
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        if not self.strengths or any(not 0.0 <= s <= 1.0 for s in self.strengths):
            raise RDMError(f"strengths must be in [0, 1], got {self.strengths}")
        if self.inputs_per_style < 1:
            raise RDMError(f"inputs_per_style must be at least 1, got {self.inputs_per_style}")


def restyle_inputs(styles: Sequence[str], n: int, start: int = RESTYLE_START) -> list[dict]:
    """n unseen toy-art inputs per style: {style, shape, colour, caption, index, image}; each style's inputs start
    1000 items after the previous style's, so their contents differ (an index draws the same content in any style)."""
    out = []
    for k, style in enumerate(styles):
        spec = ToyArtSpec(styles=(style,))
        for i in range(n):
            index = start + 1000 * k + i
            image, labels = sample_item(spec, index)
            out.append({"style": style, "shape": labels["shape"], "colour": labels["colour"],
                        "caption": make_caption(labels["shape"], labels["colour"]), "index": index,
                        "image": image})
    return out


def run_restyle(pipe, databases: Mapping[str, Any], judge, centroids, config: RestyleConfig = RestyleConfig(),
                log: Callable[[str], None] = lambda line: None, keep_images: bool = False) -> dict:
    """Restyle each input with every other style's database at each strength; per-strength accuracies.

    databases: {style: Database}; judge: the toy-art classifier (shape, colour); centroids: a CentroidJudge.
    """
    styles = list(databases)
    if len(styles) < 2:
        raise RDMError("restyling needs databases of at least two styles")
    pipe.set_progress_bar_config(disable=True)
    inputs = restyle_inputs(styles, config.inputs_per_style, config.start)
    samples = []
    for strength in config.strengths:
        batch = []
        for i, item in enumerate(inputs):
            for j, target in enumerate(s for s in styles if s != item["style"]):
                out = pipe(prompt=item["caption"] if config.prompt else None, init_image=item["image"],
                           strength=strength, databases=databases[target], seed=config.seed + 1000 * i + j,
                           num_inference_steps=config.steps, scheduler=config.scheduler,
                           guidance_scale=config.guidance)
                batch.append({"input": i, "source": item["style"], "target": target, "strength": strength,
                              "shape": item["shape"], "colour": item["colour"], "image": out.images[0]})
        for sample, pred in zip(batch, judge.predict([s["image"] for s in batch])):
            sample.update(pred_shape=pred["shape"], pred_colour=pred["colour"])
        for sample, style in zip(batch, centroids.predict([s["image"] for s in batch])):
            sample["centroid_style"] = style
        row = strength_row(batch, strength)
        log(f"strength {strength:.2f}: style-swap {row['style_swap']:.1%}, content kept {row['content']:.1%}, "
            f"both {row['both']:.1%} ({row['n']} restyles)")
        samples += batch
    rows = [strength_row([s for s in samples if s["strength"] == st], st) for st in config.strengths]
    report = {"config": asdict(config),
              "styles": styles, "inputs": [{k: v for k, v in it.items() if k != "image"} for it in inputs],
              "rows": rows, "samples": [{k: v for k, v in s.items() if k != "image"} for s in samples]}
    best = [r for r in rows if r["style_swap"] >= 0.85 and r["content"] >= 0.80]
    report["summary"] = {"goal": {"style_swap": 0.85, "content": 0.80},
                         "passing_strengths": [r["strength"] for r in best],
                         "passed": bool(best)}
    if keep_images:
        report["images"] = {"inputs": [it["image"] for it in inputs],
                            "samples": [s["image"] for s in samples]}
    return report


def strength_row(samples: Sequence[dict], strength: float) -> dict:
    """The accuracies of one strength's restyles."""
    n = len(samples)
    swap = [s["centroid_style"] == s["target"] for s in samples]
    content = [s["pred_shape"] == s["shape"] and s["pred_colour"] == s["colour"] for s in samples]
    return {"strength": strength, "n": n, "style_swap": sum(swap) / n, "content": sum(content) / n,
            "shape": sum(s["pred_shape"] == s["shape"] for s in samples) / n,
            "colour": sum(s["pred_colour"] == s["colour"] for s in samples) / n,
            "both": sum(a and b for a, b in zip(swap, content)) / n,
            "source_style": sum(s["centroid_style"] == s["source"] for s in samples) / n}


def restyle_markdown(report: dict) -> str:
    """The sweep as a markdown table."""
    lines = ["| strength | style-swap (nearest centroid) | content kept (shape and colour) | both | "
             "still the input's style |", "|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['strength']:.1f} | {100 * r['style_swap']:.1f}% | {100 * r['content']:.1f}% | "
                     f"{100 * r['both']:.1f}% | {100 * r['source_style']:.1f}% |")
    return "\n".join(lines)


def restyle_sheet(report: dict, strength: float, out: str | Path, per_style: int = 1, size: int = 96) -> Path:
    """A grid: one row per input (the first `per_style` of each source style), the input then its restyle
    with each style's database at `strength` (the input's own style: the input again, framed)."""
    if "images" not in report:
        raise RDMError("the report holds no images: run_restyle(..., keep_images=True)")
    styles = report["styles"]
    found = {}
    for s, image in zip(report["samples"], report["images"]["samples"]):
        if abs(s["strength"] - strength) < 1e-9:
            found[(s["input"], s["target"])] = image
    rows = [i for i, it in enumerate(report["inputs"])
            if i - next(j for j, x in enumerate(report["inputs"]) if x["style"] == it["style"]) < per_style]
    head, pad = 18, 4
    sheet = Image.new("RGB", (pad + (size + pad) * (len(styles) + 1), head + pad + (size + pad) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(["input"] + styles):
        draw.text((pad + c * (size + pad) + 2, 3), label, fill="black")
    for r, i in enumerate(rows):
        y = head + pad + r * (size + pad)
        sheet.paste(report["images"]["inputs"][i].resize((size, size), Image.LANCZOS), (pad, y))
        for c, style in enumerate(styles, start=1):
            x = pad + c * (size + pad)
            if style == report["inputs"][i]["style"]:
                sheet.paste(report["images"]["inputs"][i].resize((size, size), Image.LANCZOS), (x, y))
                draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline="grey", width=2)
            else:
                sheet.paste(found[(i, style)].resize((size, size), Image.LANCZOS), (x, y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def inpaint_half(pipe, image: Image.Image, database, strength: float = 1.0, seed: int = 0, **kwargs) -> tuple:
    """Redraw the right half of `image` with `database`'s style: (mask, result)."""
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle([image.width // 2, 0, image.width, image.height], fill=255)
    out = pipe(init_image=image, mask_image=mask, strength=strength, databases=database, seed=seed, **kwargs)
    return mask, out.images[0]


__all__ = ["RESTYLE_START", "STRENGTHS", "RestyleConfig", "inpaint_half", "restyle_inputs", "restyle_markdown",
           "restyle_sheet", "run_restyle", "strength_row"]
