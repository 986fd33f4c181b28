#!/usr/bin/env python
"""Does curation give a database its style back? On the demo: per style, a clean toy-art database, the same with
10% planted items of other styles, and that one after `rdm curate --apply outliers`; each sampled with the same
content-only prompts and seeds and scored with rdm score (probe towards the style, over the six clean databases)
and the blind nearest-centroid judge.

    python scripts/eval_curate.py --work runs/eval/curate --seeds 91 92

Items are unseen (toy-art indices 80,000,000 on, or --start); prompts are content pairs 16-31 of the 64.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from rdm import api
from rdm.curate import CurateOptions
from rdm.demo.blind import CentroidJudge
from rdm.demo.evaluate import content_grid
from rdm.demo.run import DEMO_CLIP, DEMO_MODEL
from rdm.demo.toyart import STYLES, ToyArtSpec, generate, make_caption
from rdm.sampling.score import ScoreOptions, score_images, train_probe

START = 80_000_000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the pictures and databases")
    p.add_argument("--n", type=int, default=64, help="clean items per style")
    p.add_argument("--planted", type=float, default=0.1, help="share of planted off-style items")
    p.add_argument("--contents", type=int, default=16)
    p.add_argument("--content-offset", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[91, 92])
    p.add_argument("--start", type=int, default=START, help="toy-art index of the first item (other values: other items)")
    a = p.parse_args(argv)
    from rdm.sampling.pipeline import RDMPipeline

    work, clip = Path(a.work), f"local-dir:{DEMO_CLIP}"
    home = str(work / "indexes")
    n_off = max(1, round(a.n * a.planted / (1 - a.planted)))
    for k, style in enumerate(STYLES):
        clean = work / "clean" / style
        generate(ToyArtSpec(), a.n, clean, styles=[style], start=a.start + 10_000 * k)
        planted = work / "planted" / style
        if planted.exists():
            shutil.rmtree(planted)
        shutil.copytree(clean, planted)
        others = [s for s in STYLES if s != style]
        extra = work / "extra" / style
        for j in range(n_off):  # other styles, round robin, contents of their own
            generate(ToyArtSpec(), 1, extra / str(j), styles=[others[j % len(others)]],
                     start=a.start + 10_000 * k + 5_000 + j)
            for png in (extra / str(j)).rglob("*.png"):
                shutil.copy(png, planted / style / f"planted-{j}-{png.name}")
        (planted / "metadata.jsonl").unlink(missing_ok=True)  # captions are not needed: images only
        api.build_index(str(clean), name=f"clean-{style}", clip=clip, indexes=home, workers=0, progress=False,
                        overwrite=True)
        api.build_index(str(planted), name=f"planted-{style}", clip=clip, indexes=home, workers=0, progress=False,
                        overwrite=True)
        api.build_index(str(planted), name=f"curated-{style}", clip=clip, indexes=home, workers=0, progress=False,
                        overwrite=True)
        report, removed, _ = api.curate(f"curated-{style}", CurateOptions(), apply=["outliers"], indexes=home)
        hit = sum("planted-" in i for i in removed)
        print(f"{style}: planted {n_off}, curate removed {len(removed)} ({hit} of them planted)", flush=True)

    pipe = RDMPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    centroids = CentroidJudge.from_toyart(pipe.embedder, STYLES, 200)
    clean_dbs = [api.open_database(f"clean-{s}", home) for s in STYLES]
    probe = train_probe(clean_dbs)
    prompts = [make_caption(s, c) for s, c in content_grid(64)[a.content_offset:a.content_offset + a.contents]]
    rows = {}
    for kind in ("clean", "planted", "curated"):
        probe_acc, centroid_acc = [], []
        for style in STYLES:
            db = api.open_database(f"{kind}-{style}", home)
            images = []
            for seed in a.seeds:
                images += pipe(prompt=prompts, databases=db, seed=[seed * 1000 + i for i in range(len(prompts))],
                               copy_guard=None).images
            r = score_images(images, clean_dbs, ScoreOptions(target=f"clean-{style}"), embedder=pipe.embedder,
                             probe=probe)
            probe_acc.append(r.summary["probe_accuracy"])
            centroid_acc.append(float(np.mean([p == style for p in centroids.predict(images)])))
        rows[kind] = {"probe": float(np.mean(probe_acc)), "centroid": float(np.mean(centroid_acc)),
                      "per_style_probe": dict(zip(STYLES, probe_acc))}
        print(f"{kind}: probe {rows[kind]['probe']:.3f}, centroid {rows[kind]['centroid']:.3f}", flush=True)
    print("| databases | style-swap (rdm score probe) | nearest centroid |\n|---|---:|---:|")
    for kind, r in rows.items():
        print(f"| {kind} | {100 * r['probe']:.1f}% | {100 * r['centroid']:.1f}% |")
    (work / "curate_eval.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
