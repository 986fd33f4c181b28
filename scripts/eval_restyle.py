#!/usr/bin/env python
"""Restyling measured on the demo model: unseen toy art of each style, image-to-image with every other style's
database over a strength sweep; style-swap by the nearest style centroid, content kept by the toy-art judge.

    python scripts/eval_restyle.py --databases 'large-{style}' --indexes IDX --classifier JUDGE \\
        --out scripts/results/restyle_demo.json --sheet docs/restyle-grid.png --sheet-strength 0.7

IDX holds per-style databases of unseen toy art (scripts/eval_style_swap.py databases); JUDGE is the toy-art judge
(scripts/eval_style_swap.py classifier). Writes the JSON report, a .md table beside it, and optionally the restyle
grid and an inpainting example (the right half of an input redrawn with another style's database).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdm.demo.blind import CentroidJudge
from rdm.demo.classifier import ToyArtClassifier
from rdm.demo.evaluate import open_style_databases
from rdm.demo.restyle import (RESTYLE_START, STRENGTHS, RestyleConfig, inpaint_half, restyle_inputs,
                              restyle_markdown, restyle_sheet, run_restyle)
from rdm.demo.run import DEMO_MODEL
from rdm.demo.toyart import STYLES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="rdm model folder (default: the bundled demo model)")
    p.add_argument("--databases", required=True, help="database name template with {style}, e.g. large-{style}")
    p.add_argument("--indexes", default=None, help="databases home (default $RDM_INDEXES or ./indexes)")
    p.add_argument("--classifier", required=True, help="the toy-art judge folder")
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--inputs", type=int, default=3, help="unseen inputs per source style")
    p.add_argument("--start", type=int, default=RESTYLE_START, help="toy-art index of the first input")
    p.add_argument("--prompt", action="store_true", help="query by the input's caption (default: by the image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--scheduler", default=None, help="the sampler (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--centroids", type=int, default=200, help="clean unseen toy-art images per style centroid")
    p.add_argument("--out", default="restyle.json")
    p.add_argument("--sheet", default=None, help="also write the restyle grid PNG")
    p.add_argument("--sheet-strength", type=float, default=0.7, help="the grid's strength (one of --strengths)")
    p.add_argument("--inpaint", default=None, help="also write an inpainting example PNG (input, mask, result)")
    a = p.parse_args(argv)

    from PIL import Image

    from rdm.sampling.pipeline import RDMPipeline

    pipe = RDMPipeline.from_pretrained(a.model)
    databases = open_style_databases(a.databases, a.styles, a.indexes)
    judge = ToyArtClassifier.load(a.classifier)
    centroids = CentroidJudge.from_toyart(pipe.embedder, a.styles, a.centroids)
    config = RestyleConfig(strengths=tuple(a.strengths), inputs_per_style=a.inputs, start=a.start, prompt=a.prompt,
                           seed=a.seed, steps=a.steps, scheduler=a.scheduler, guidance=a.guidance)
    report = run_restyle(pipe, databases, judge, centroids, config, log=lambda line: print(line, flush=True),
                         keep_images=bool(a.sheet))
    report["model"] = {"path": str(Path(a.model).resolve()), "fingerprint": pipe.fingerprint,
                       "defaults": pipe.sampling_defaults.to_dict()}
    report["databases"] = {s: {"name": db.name, "items": db.count} for s, db in databases.items()}
    report["judge"] = {"path": str(Path(a.classifier).resolve()), "heldout": judge.metrics.get("heldout")}
    if a.sheet:
        print(f"restyle grid {restyle_sheet(report, a.sheet_strength, a.sheet)}")
        report.pop("images")
    if a.inpaint:
        first = restyle_inputs([a.styles[0]], 1, a.start)[0]
        target = a.styles[-1]
        mask, result = inpaint_half(pipe, first["image"], databases[target], seed=a.seed,
                                    num_inference_steps=a.steps, scheduler=a.scheduler, guidance_scale=a.guidance)
        size = 128
        strip = Image.new("RGB", (3 * size + 16, size + 8), "white")
        for i, im in enumerate((first["image"], mask.convert("RGB"), result)):
            strip.paste(im.resize((size, size), Image.LANCZOS), (4 + i * (size + 4), 4))
        Path(a.inpaint).parent.mkdir(parents=True, exist_ok=True)
        strip.save(a.inpaint)
        print(f"inpainting example {a.inpaint}: a {first['style']} {first['caption'][2:]}, right half redrawn with "
              f"{databases[target].name}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = restyle_markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    s = report["summary"]
    print(f"strengths meeting style-swap >= 85% and content >= 80%: {s['passing_strengths'] or 'none'}")
    print(f"report {out} (and {out.with_suffix('.md')})")


if __name__ == "__main__":
    main()
