#!/usr/bin/env python
"""Why the demo model held its style at 8 DDIM steps and lost it at 25 and 50: one row per hypothesis.

    python scripts/diagnose_sampler.py --model rdm/assets/demo/rdm --databases small-{style} --indexes IDX \\
        --out scripts/results/diagnose_sampler.md

Each row samples the same content-only prompts and seeds against every style database and judges them blind
(nearest style centroid in the demo CLIP's space, border colour: rdm.demo.blind). Besides the judges it reports
how far the x0 estimates overshoot the image range: the share of x0 components outside [-1, 1] over all steps.

Hypotheses (the issue's leads): guidance over-exposure on a zero-terminal-SNR model (Lin et al. 2024, 3.4:
guidance_rescale), x0 clipping with v-prediction, the timesteps the fine-tune covered, the model's training. "before"
rows run DDIM as rdm did before the fix: x0 clipped (the model's clip_sample) with the model's own noise estimate
kept (diffusers' use_clipped_model_output=False).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch

import rdm.sampling.pipeline as pipeline_module
from rdm.demo.blind import CentroidJudge
from rdm.demo.evaluate import (StyleSwapConfig, content_grid, database_borders, open_style_databases,
                               pipeline_sampler, run_sampler_grid)
from rdm.demo.toyart import STYLES
from rdm.sampling.pipeline import RDMPipeline

FIXED_STEP_KWARGS = pipeline_module._step_kwargs

ROWS = (  # label, steps, guidance, guidance_rescale, x0 clipping ("kept eps" | "recomputed eps" | "off")
    ("before: DDIM 8 steps, guidance 3", 8, 3.0, 0.0, "kept eps"),
    ("before: DDIM 50 steps, guidance 3", 50, 3.0, 0.0, "kept eps"),
    ("before + guidance_rescale 0.7", 50, 3.0, 0.7, "kept eps"),
    ("before, no guidance (scale 1)", 50, 1.0, 0.0, "kept eps"),
    ("DDIM 50, guidance 3, no x0 clipping", 50, 3.0, 0.0, "off"),
    ("DDIM 50, guidance 3, eps from the clipped x0 (the fix)", 50, 3.0, 0.0, "recomputed eps"),
)


def kept_eps_step_kwargs(scheduler, eta, generator):
    """rdm's DDIM step arguments before the fix: the model's noise estimate kept after x0 is clipped."""
    out = FIXED_STEP_KWARGS(scheduler, eta, generator)
    out.pop("use_clipped_model_output", None)
    return out


class Overshoot:
    """Counts the x0 components outside [-1, 1] (before any clipping) over every DDIM step of a run."""

    def __init__(self, scheduler):
        self.scheduler, self.outside, self.total = scheduler, 0, 0
        self.step = scheduler.step
        self.__signature__ = inspect.signature(scheduler.step)  # so the pipeline passes eta etc. as before

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        a = self.scheduler.alphas_cumprod[int(timestep)]
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output  # v-prediction
        if self.scheduler.config.prediction_type == "epsilon":
            x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        self.outside += int((x0.abs() > 1).sum())
        self.total += x0.numel()
        return self.step(model_output, timestep, sample, *args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--databases", required=True, help="database name template with {style}")
    p.add_argument("--indexes", default=None)
    p.add_argument("--contents", type=int, default=4)
    p.add_argument("--content-offset", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[777])
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = p.parse_args()

    pipe = RDMPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    clip_sample = pipe.scheduler.config.get("clip_sample")
    databases = open_style_databases(a.databases, STYLES, a.indexes)
    judge = CentroidJudge.from_toyart(pipe.embedder, STYLES, 200)
    borders = database_borders(databases)
    config = StyleSwapConfig(contents=content_grid(64)[a.content_offset:a.content_offset + a.contents],
                             seeds=tuple(a.seeds), batch_size=32, control=False)
    lines = ["| hypothesis / setting | style-swap | border error | x0 outside [-1, 1] |", "|---|---:|---:|---:|"]
    for label, steps, guidance, rescale, clipping in ROWS:
        pipe.scheduler.register_to_config(clip_sample=clip_sample and clipping != "off")
        pipeline_module._step_kwargs = kept_eps_step_kwargs if clipping == "kept eps" else FIXED_STEP_KWARGS
        counter = Overshoot(pipe.scheduler)
        pipe.scheduler.step = counter
        try:
            cell = {"label": label}
            row = run_sampler_grid(
                lambda _: pipeline_sampler(pipe, num_inference_steps=steps, guidance_scale=guidance,
                                           scheduler=None, guidance_rescale=rescale, indexes=a.indexes),
                databases, judge, borders, config, [cell])[0]
        finally:
            del pipe.scheduler.step
            pipeline_module._step_kwargs = FIXED_STEP_KWARGS
            pipe.scheduler.register_to_config(clip_sample=clip_sample)
        share = counter.outside / max(counter.total, 1)
        lines.append(f"| {label} | {100 * row['centroid_accuracy']:.1f}% | {row['border_error']:.3f} | "
                     f"{100 * share:.1f}% |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
