#!/usr/bin/env python
"""The style-swap proof for the demo RDM: the toy-art judge, the per-style databases, the evaluation.

    # 1. the judge (a small CNN: style, shape and colour heads), held-out accuracy printed and saved
    python scripts/eval_style_swap.py classifier --out models/toyart-judge
    # 2. one database per style, embedded with the demo CLIP (skip if the demo's databases exist)
    python scripts/eval_style_swap.py databases --clip local-dir:models/demo-clip --root data/toyart-styles \\
        --n-per-style 2000 --template toyart-{style}
    # 3. same weights and seeds, only the database changes; a JSON report, a markdown table, a contact sheet
    python scripts/eval_style_swap.py evaluate --model models/demo-rdm --databases toyart-{style} \\
        --classifier models/toyart-judge --contents 16 --seeds 0 1 2 3 --out reports/style_swap.json
    # 4. the blind style swap over the sampler grid, for small and large databases
    python scripts/eval_style_swap.py grid --model models/demo-rdm --databases small-{style} large-{style} \\
        --out reports/style_swap_grid.json

See rdm/demo/evaluate.py for what is measured: the judge's style-swap and content accuracies, the blind judges
(rdm/demo/blind.py: nearest style centroid in the model's CLIP space, border colour), and rdm score's
judge-free retrieval precision, probe accuracy and CLIP content similarity (--no-score skips them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdm.demo.classifier import Augment, ClassifierConfig, ClassifierTrainConfig, ToyArtClassifier, train_classifier
from rdm.demo.blind import CentroidJudge
from rdm.demo.evaluate import (SAMPLER_GRID, StyleSwapConfig, build_style_databases, contact_sheet, content_grid,
                               database_borders, database_scorer, grid_markdown, grid_sampler, open_style_databases,
                               pipeline_sampler, run_sampler_grid, run_style_swap)
from rdm.sampling.conditioning import NeighbourControl
from rdm.demo.toyart import ALL_STYLES, COLOURS, SHAPES, STYLES, ToyArtSpec
from rdm.sampling.selection import Selection


def say(line: str) -> None:
    print(line, flush=True)


def cmd_classifier(a: argparse.Namespace) -> None:
    config = ClassifierTrainConfig(n_train=a.n_train, n_eval=a.n_eval, epochs=a.epochs, batch_size=a.batch_size,
                                   lr=a.lr, render_sizes=tuple(a.sizes), seed=a.seed, device=a.device,
                                   augment=Augment(tint=a.tint))
    _, metrics = train_classifier(config, ClassifierConfig(image_size=a.image_size), out=a.out, log=say)
    say(json.dumps(metrics, indent=2))
    worst = min(metrics["heldout"].values())
    verdict = "passed" if worst >= 0.98 else "NOT reached"
    say(f"saved {a.out}; worst held-out head accuracy {worst:.4f} (goal 0.98: {verdict})")


def cmd_databases(a: argparse.Namespace) -> None:
    spec = ToyArtSpec(**{k: tuple(v) for k, v in (("shapes", a.shapes), ("colours", a.colours)) if v})
    names = build_style_databases(a.clip, a.root, a.n_per_style, a.template, a.styles, a.indexes, start=a.start,
                                  spec=spec)
    say("built " + ", ".join(names.values()))


def cmd_evaluate(a: argparse.Namespace) -> None:
    from rdm.sampling.pipeline import RDMPipeline  # diffusers is only needed here

    pipe = RDMPipeline.from_pretrained(a.model)
    if a.device:
        pipe = pipe.to(a.device)
    sampler = pipeline_sampler(pipe, k=a.k, num_inference_steps=a.steps, guidance_scale=a.guidance,
                               scheduler=a.scheduler, indexes=a.indexes, eta=a.eta, style_scale=a.style_scale,
                               guidance_rescale=a.guidance_rescale,
                               control=NeighbourControl(selection=Selection(diversity=a.diversity),
                                                        content_subtract=a.content_subtract))
    databases = open_style_databases(a.databases, a.styles, a.indexes)
    scorer = None if a.no_score else database_scorer(databases, k=a.score_k)
    judge = ToyArtClassifier.load(a.classifier)
    # the blind judges: style centroids of clean unseen toy art in the model's own CLIP space, border colours
    centroids = CentroidJudge.from_toyart(pipe.embedder, a.styles, a.centroids) if a.centroids else None
    borders = None if a.no_borders else database_borders(databases)
    config = StyleSwapConfig(contents=content_grid(64)[a.content_offset:a.content_offset + a.contents],
                             seeds=tuple(a.seeds), batch_size=a.batch_size,
                             control=not a.no_control)
    report = run_style_swap(sampler, databases, judge, config, keep_images=bool(a.sheet), log=say, scorer=scorer,
                            centroids=centroids, reference_borders=borders)
    report["model"] = {"path": str(Path(a.model).resolve()), "fingerprint": pipe.fingerprint}
    report["sampling"] = {"k": a.k, "steps": a.steps, "guidance": a.guidance, "style_scale": a.style_scale,
                          "eta": a.eta, "scheduler": a.scheduler, "guidance_rescale": a.guidance_rescale,
                          "model_defaults": pipe.sampling_defaults.to_dict(), "content_subtract": a.content_subtract,
                          "diversity": a.diversity}
    report["databases"] = {s: getattr(db, "fingerprint", None) for s, db in databases.items()}
    report["judge"] = {"path": str(Path(a.classifier).resolve()), "heldout": judge.metrics.get("heldout")}
    if a.sheet:
        say(f"contact sheet {contact_sheet(report, a.sheet)}")
        report.pop("images")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(report["markdown"] + "\n")
    say(report["markdown"])
    say(f"report {out} (and {out.with_suffix('.md')})")


def cmd_grid(a: argparse.Namespace) -> None:
    """The blind style swap at every cell of SAMPLER_GRID (and the model's own defaults), for each database set."""
    import csv

    from rdm.sampling.pipeline import RDMPipeline

    pipe = RDMPipeline.from_pretrained(a.model)
    if a.device:
        pipe = pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    centroids = CentroidJudge.from_toyart(pipe.embedder, a.styles, a.centroids)
    config = StyleSwapConfig(contents=content_grid(64)[a.content_offset:a.content_offset + a.contents],
                             seeds=tuple(a.seeds), batch_size=a.batch_size, control=False)
    cells = [c for c in SAMPLER_GRID if not a.cells or c["label"] in a.cells]
    report, tables = {"model": {"path": str(Path(a.model).resolve()), "fingerprint": pipe.fingerprint},
                      "contents": [list(c) for c in config.contents], "seeds": list(config.seeds), "sets": {}}, []
    for template in a.databases:
        databases = open_style_databases(template, a.styles, a.indexes)
        sizes = sorted({db.count for db in databases.values()})
        say(f"databases {template} ({'/'.join(map(str, sizes))} items each)")
        rows = run_sampler_grid(lambda cell: grid_sampler(pipe, cell, a.indexes), databases, centroids,
                                database_borders(databases), config, cells, log=say)
        report["sets"][template] = {"items": sizes, "rows": rows}
        tables.append(grid_markdown(rows, f"{template} ({'/'.join(map(str, sizes))} items per database)"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["databases", "items", "sampler", "scheduler", "steps", "guidance", "style_swap", "border_error",
                    "weakest", "weakest_style_swap", "holds"])
        for template, entry in report["sets"].items():
            for r in entry["rows"]:
                w.writerow([template, "/".join(map(str, entry["items"])), r["label"], r.get("scheduler", ""),
                            r.get("steps", ""), r.get("guidance", ""), f"{r['centroid_accuracy']:.4f}",
                            f"{r['border_error']:.4f}", r["weakest"], f"{r['weakest_accuracy']:.4f}", r["holds"]])
    say("\n\n".join(tables))
    say(f"report {out} (and .md, .csv beside it)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    defaults = ClassifierTrainConfig()

    c = sub.add_parser("classifier", help="train the toy-art judge (style, shape, colour)")
    c.add_argument("--out", required=True, help="folder to write (classifier.safetensors + classifier.json)")
    c.add_argument("--n-train", type=int, default=defaults.n_train)
    c.add_argument("--n-eval", type=int, default=defaults.n_eval)
    c.add_argument("--epochs", type=int, default=defaults.epochs)
    c.add_argument("--batch-size", type=int, default=defaults.batch_size)
    c.add_argument("--lr", type=float, default=defaults.lr)
    c.add_argument("--sizes", type=int, nargs="+", default=list(defaults.render_sizes),
                   help="toy-art sides rendered for training, e.g. 64 128")
    c.add_argument("--image-size", type=int, default=ClassifierConfig().image_size, help="the network's input side")
    c.add_argument("--seed", type=int, default=defaults.seed)
    c.add_argument("--device", default=defaults.device)
    c.add_argument("--tint", type=float, default=0.0,
                   help="augment with a blend towards a random colour of up to this weight (0: off)")
    c.set_defaults(run=cmd_classifier)

    d = sub.add_parser("databases", help="render toy art per style and build one database per style")
    d.add_argument("--clip", required=True, help="the demo CLIP, e.g. local-dir:models/demo-clip")
    d.add_argument("--root", required=True, help="folder for the rendered images (ROOT/<style>/)")
    d.add_argument("--n-per-style", type=int, default=2000)
    d.add_argument("--template", default="toyart-{style}", help="database name, with {style}")
    d.add_argument("--styles", nargs="+", default=list(STYLES), choices=ALL_STYLES,
                   help="default: the six the demo model learned; cutout is the one it never saw (its adapter's)")
    d.add_argument("--start", type=int, default=0, help="first toy-art index")
    d.add_argument("--shapes", nargs="+", default=None, choices=SHAPES,
                   help="only these shapes (a one-content collection, e.g. --shapes circle --colours red)")
    d.add_argument("--colours", nargs="+", default=None, choices=list(COLOURS), help="only these colours")
    d.add_argument("--indexes", default=None, help="databases home (default $RDM_INDEXES or ./indexes)")
    d.set_defaults(run=cmd_databases)

    e = sub.add_parser("evaluate", help="sample with every style's database and the control; judge; report")
    e.add_argument("--model", required=True, help="rdm model folder")
    e.add_argument("--databases", default="toyart-{style}", help="database name template, with {style}")
    e.add_argument("--classifier", required=True, help="judge folder from the `classifier` command")
    e.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    e.add_argument("--contents", type=int, default=16, help="content prompts (shape x colour pairs, 1-64)")
    e.add_argument("--content-offset", type=int, default=0, help="first pair of the 64 (choose unused ones)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    e.add_argument("--k", type=int, default=None, help="neighbours per query (default: the model's)")
    e.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    e.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    e.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale (default: the model's)")
    e.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the model's)")
    e.add_argument("--content-subtract", type=float, default=0.0, help="rdm sample --content-subtract (0: off)")
    e.add_argument("--diversity", type=float, default=0.0, help="rdm sample --diversity (0: the nearest k)")
    e.add_argument("--style-scale", type=float, default=None, help="the neighbours' guidance scale (rdm sample "
                   "--style-scale); default: plain guidance")
    e.add_argument("--centroids", type=int, default=200,
                   help="clean unseen toy-art images per style for the nearest-centroid judge (0: skip it)")
    e.add_argument("--no-borders", action="store_true", help="skip the border-colour measure")
    e.add_argument("--score-k", type=int, default=10, help="neighbours per sample for rdm score's retrieval precision")
    e.add_argument("--no-score", action="store_true", help="skip rdm score (the judge-free measures)")
    e.add_argument("--scheduler", default=None, help="the model's (default), ddim-trailing (rdm demo's), dpm++ ...")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--no-control", action="store_true", help="skip the query-alone control")
    e.add_argument("--device", default=None, help="move the pipeline there (cuda, cpu)")
    e.add_argument("--indexes", default=None)
    e.add_argument("--out", default="style_swap.json", help="report JSON (a .md with the tables goes beside it)")
    e.add_argument("--sheet", default=None, help="also write a contact sheet PNG")
    e.set_defaults(run=cmd_evaluate)

    g = sub.add_parser("grid", help="the blind style swap over the sampler grid (DDIM 8/25/50, DPM-Solver++ 10/20/50, "
                       "guidance 3 and 5, the model's defaults) for each database set")
    g.add_argument("--model", required=True, help="rdm model folder")
    g.add_argument("--databases", nargs="+", required=True, help="database name templates with {style}, e.g. "
                   "small-{style} large-{style}: one grid each")
    g.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    g.add_argument("--contents", type=int, default=8, help="content prompts per database (shape x colour pairs)")
    g.add_argument("--content-offset", type=int, default=0, help="first pair of the 64 (choose unused ones)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    g.add_argument("--cells", nargs="*", default=None, help="only these cell labels (default: all)")
    g.add_argument("--centroids", type=int, default=200, help="clean unseen toy-art images per style centroid")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", default=None)
    g.add_argument("--indexes", default=None)
    g.add_argument("--out", default="style_swap_grid.json", help="report JSON (.md and .csv beside it)")
    g.set_defaults(run=cmd_grid)

    a = p.parse_args(argv)
    a.run(a)


if __name__ == "__main__":
    main()
