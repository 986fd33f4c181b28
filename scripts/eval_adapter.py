#!/usr/bin/env python
"""Does an adapter draw its collection's style the way a person would see it? Samples of the demo model with and
without an adapter, judged by pixels (rdm.demo.blind.figure_fit), over sampler settings.

The toy art's `cutout` style is a cream shape on a ground of the colour. A sample of "a blue heart" drawn with a
cutout database counts as cutout when its figure is a heart (the best-fitting filled toy-art shape), its ground
is nearest to blue's cutout ground (0.85 x blue) and its figure is cream (mean |RGB - cream| < 0.12). The judge
gets 100% of real cutout items right (80 unseen items; `--check`). rdm score's linear probe gives the style swap
over all seven databases; this says whether the shape and colours are right too.

    python scripts/eval_adapter.py --db small-cutout --adapter cutout \\
        --prompt "a purple triangle" --prompt "an orange heart" ... --seeds 201,202 --grid --out report.json

Prints a markdown table (one row per sampler setting, adapter off and on) and writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from rdm.demo.blind import figure_fit, nearest_colour
from rdm.demo.toyart import COLOURS, CUTOUT_GROUND, CUTOUT_PAPER, SHAPES, ToyArtSpec, sample_item
from rdm.sampling.score import SAMPLER_GRID

CREAM = np.array(CUTOUT_PAPER, np.float32)
CREAM_TOLERANCE = 0.12  # mean absolute RGB difference from CREAM of a cream figure


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(shape, colour) named in a toy-art prompt."""
    words = re.findall(r"[a-z]+", prompt.lower())
    shape = next((w for w in words if w in SHAPES), None)
    colour = next((w for w in words if w in COLOURS), None)
    if shape is None or colour is None:
        raise SystemExit(f"error: prompt {prompt!r} names no toy-art shape and colour")
    return shape, colour


def judge(image, shape: str, colour: str) -> dict:
    fit = figure_fit(image)
    cream = fit["figure_rgb"] is not None and float(np.abs(np.asarray(fit["figure_rgb"]) - CREAM).mean()) \
        < CREAM_TOLERANCE
    ground = nearest_colour(fit["ground_rgb"], CUTOUT_GROUND)
    row = {"shape": fit["shape"], "iou": fit["iou"], "ground": ground, "cream": bool(cream),
           "shape_ok": fit["shape"] == shape, "ground_ok": ground == colour}
    row["cutout"] = row["shape_ok"] and row["ground_ok"] and row["cream"]
    return row


def summary(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("cutout", "shape_ok", "ground_ok", "cream")}


def check(n: int = 80, start: int = 50_000_000) -> dict:
    """The judge on real, unseen cutout items."""
    spec = ToyArtSpec(styles=("cutout",))
    rows = []
    for i in range(n):
        image, label = sample_item(spec, start + i)
        rows.append(judge(image, label["shape"], label["colour"]))
    return summary(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the bundled demo model)")
    ap.add_argument("--db", required=True, help="the collection's database (e.g. small-cutout)")
    ap.add_argument("--adapter", required=True, help="NAME[:WEIGHT] or a folder")
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--seeds", default="201,202")
    ap.add_argument("--grid", action="store_true", help="over rdm score's sampler grid (else the model's defaults)")
    ap.add_argument("--indexes", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--sheet", default=None, help="a PNG of every sample, a row per setting and adapter state")
    ap.add_argument("--check", action="store_true", help="first, the judge on 80 real cutout items")
    a = ap.parse_args()

    from rdm.models.adapters import parse_adapter_spec
    from rdm.models.assets import DEMO_MODEL
    from rdm.sampling.pipeline import RDMPipeline

    judge_check = check() if a.check else None
    if judge_check:
        print(f"judge on 80 real cutout items: {json.dumps(judge_check)}", flush=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    labels = [parse_prompt(p) for p in a.prompt]
    prompts = [p for p in a.prompt for _ in seeds]
    seed_list = [s for _ in a.prompt for s in seeds]
    truth = [lab for lab in labels for _ in seeds]
    a.model = str(a.model or DEMO_MODEL)
    pipe = RDMPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    name, weight = parse_adapter_spec(a.adapter)
    cells = SAMPLER_GRID if a.grid else SAMPLER_GRID[:1]
    report, sheet_rows = {"model": a.model, "db": a.db, "adapter": name, "weight": weight, "prompts": a.prompt,
                          "seeds": seeds, "judge_check": judge_check, "cells": []}, []
    print(f"| setting | adapter off: cutout | shape | ground | cream | {name}: cutout | shape | ground | cream |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        row = {"label": cell["label"]}
        for state, specs in (("off", []), ("on", [(name, weight)])):
            pipe.set_adapters(specs)
            t = time.perf_counter()
            images = pipe(prompt=prompts, databases=a.db, seed=seed_list, num_inference_steps=cell.get("steps"),
                          guidance_scale=cell.get("guidance"), scheduler=cell.get("scheduler"), indexes=a.indexes,
                          output_type="pil").images
            judged = [judge(im, s, c) for im, (s, c) in zip(images, truth)]
            row[state] = {**summary(judged), "seconds": round(time.perf_counter() - t, 1), "samples": judged}
            sheet_rows.append((f"{cell['label']}\nadapter {state}",
                               [(im, f"{j['shape']}, {j['ground']}\n{'cutout' if j['cutout'] else ''}")
                                for im, j in zip(images, judged)]))
        report["cells"].append(row)
        off, on = row["off"], row["on"]
        print(f"| {cell['label']} | " + " | ".join(f"{100 * off[k]:.0f}%" for k in ("cutout", "shape_ok", "ground_ok",
                                                                                     "cream"))
              + " | " + " | ".join(f"{100 * on[k]:.0f}%" for k in ("cutout", "shape_ok", "ground_ok", "cream"))
              + " |", flush=True)
    pipe.set_adapters([])
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if a.sheet:
        from rdm.images.sheets import grid

        grid([tiles for _, tiles in sheet_rows], row_labels=[label for label, _ in sheet_rows],
             title=f"{a.db}: the judged shape and ground of each sample", size=96).save(a.sheet)


if __name__ == "__main__":
    main()
