#!/usr/bin/env python
"""Sampler x steps for `rdm demo`: seconds per grid row and what the samples' borders look like, as a table.

    python scripts/bench_demo.py                                  # the bundled demo model, this machine
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_demo.py   # as an AVX2-only CPU would
    python scripts/bench_demo.py --variants ddim:25 ddim-trailing:8 dpm++:8 --sheet bench_demo.png

Each variant samples the demo's prompts and seeds with a few style databases (`rdm demo`'s), as one demo row
each. "border" is the mean RGB of the samples' outer 4 pixels (rdm.demo.blind.border_rgb) and "spread" its standard deviation over the
samples: toy art has a white, grey or black border, so a large spread is the seed-dependent tint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdm import api
from rdm.db.database import Database
from rdm.demo.blind import border_rgb
from rdm.demo.evaluate import build_style_databases
from rdm.demo.run import DEFAULT_PROMPTS, DEMO_CLIP, DEMO_MODEL, DEMO_START
from rdm.demo.toyart import ToyArtSpec
from rdm.sampling.pipeline import RDMPipeline


def border(images: np.ndarray) -> np.ndarray:
    """(N, 3) border colours (rdm.demo.blind.border_rgb) of images (N, H, W, 3) in [0, 1]."""
    return np.stack([border_rgb(im) for im in images])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--clip", default=f"local-dir:{DEMO_CLIP}")
    p.add_argument("--variants", nargs="+", default=["ddim:25", "ddim-trailing:8", "ddim-trailing:10", "dpm++:8",
                                                      "dpm++:10"], help="SCHEDULER:STEPS")
    p.add_argument("--styles", nargs="+", default=["flat", "dotted", "neon"])
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (rdm demo: 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/bench_demo", help="folder for the style databases")
    p.add_argument("--sheet", default=None, help="also write the samples as one PNG, a row per variant and style")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    names = build_style_databases(a.clip, Path(a.work) / "toyart", 48, "{style}", a.styles, str(Path(a.work) / "idx"),
                                  start=DEMO_START, spec=ToyArtSpec(size=64))
    dbs = {style: Database.open(name, str(Path(a.work) / "idx")) for style, name in names.items()}
    pipe = RDMPipeline.from_pretrained(a.model, embedder=api.load_embedder(a.clip))
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    rows, sheet = [], []
    for variant in a.variants:
        scheduler, steps = variant.rsplit(":", 1)
        seconds, borders = [], []
        for db in dbs.values():
            t0 = time.perf_counter()
            out = pipe(prompt=list(DEFAULT_PROMPTS), databases=db, num_images_per_prompt=a.seeds,
                       num_inference_steps=int(steps), guidance_scale=3.0, scheduler=scheduler, seed=0,
                       output_type="np")
            seconds.append(time.perf_counter() - t0)
            borders.append(border(out.images))
            sheet.append(np.concatenate(list(out.images), 1))
        b = np.concatenate(borders)
        rows.append(f"| {scheduler} | {steps} | {np.median(seconds):.1f} | {7 * np.median(seconds):.0f} | "
                    f"{' '.join(f'{v:.2f}' for v in b.mean(0))} | {b.std(0).mean():.2f} |")
    print(f"threads {a.threads}, {len(DEFAULT_PROMPTS) * a.seeds} images per row, guidance 3.0\n")
    print("| sampler | steps | s per row | s for the 7 rows | border RGB | border spread |")
    print("|---|---:|---:|---:|---|---:|")
    print("\n".join(rows))
    if a.sheet:
        Image.fromarray((np.concatenate(sheet, 0) * 255).round().astype(np.uint8)).save(a.sheet)
        print(f"\nsheet {a.sheet}: rows = variants x styles ({', '.join(a.styles)}), in order")


if __name__ == "__main__":
    main()
