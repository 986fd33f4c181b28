#!/usr/bin/env python
"""Calibrate the copy guard (rdm.sampling.copyguard) on the demo model: how close do ordinary samples come to their nearest
database item, how close do deliberate copies and item-to-item duplicates come, and what does a threshold flag?

    python scripts/calibrate_copy_guard.py --databases 'large-{style}' --indexes IDX --seeds 61 62

- ordinary: content-only prompts sampled with each style's database at the model's own settings (fresh prompts
  and seeds), the guard's similarity to the nearest item (neighbours and the database's nearest) and pixel distance;
- copies: a database item given as the only reference with weight 8 and its own caption as the prompt, and the item
  restyled from itself (--init-image ITEM --strength 0.15 and 0.3): outputs made to copy it;
- duplicates: each item against a resized, a JPEG re-encoded (quality 70) and a 5%-cropped copy of itself, the
  pairs a deduplicator calls the same picture.
Prints percentiles of each distribution and the share each threshold flags (false positives on ordinary samples).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from rdm.sampling.copyguard import DEFAULT_THRESHOLD, PIXEL_THRESHOLD, CopyGuard, pixel_distance
from rdm.demo.evaluate import content_grid, open_style_databases
from rdm.demo.run import DEMO_MODEL
from rdm.demo.toyart import STYLES, make_caption


def duplicates(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=70)
    dx, dy = max(1, w // 20), max(1, h // 20)
    return [image.resize((w * 2, h * 2), Image.BICUBIC).resize((w, h), Image.BICUBIC),
            Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            image.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BICUBIC)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--databases", required=True, help="database name template with {style}")
    p.add_argument("--indexes", default=None)
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--contents", type=int, default=8, help="content-only prompts per database")
    p.add_argument("--content-offset", type=int, default=40, help="first of the 64 (shape, colour) pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[61, 62])
    p.add_argument("--items", type=int, default=4, help="items per database copied on purpose")
    p.add_argument("--item-offset", type=int, default=0, help="the first of them (their row in the database)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.97, 0.98, 0.985, 0.99, 0.995])
    p.add_argument("--out", default=None, help="also write the measurements as JSON")
    a = p.parse_args(argv)

    from rdm.sampling.pipeline import RDMPipeline

    pipe = RDMPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    guard = CopyGuard(threshold=-1.0)  # measure only: every verdict carries the similarity
    databases = open_style_databases(a.databases, a.styles, a.indexes)
    contents = content_grid(64)[a.content_offset:a.content_offset + a.contents]
    prompts = [make_caption(s, c) for s, c in contents]
    found = {"ordinary": [], "copy (ref x8)": [], "copy (init 0.15)": [], "copy (init 0.3)": [], "duplicates": []}
    for style, db in databases.items():
        for seed in a.seeds:
            out = pipe(prompt=prompts, databases=db, seed=[seed * 1000 + i for i in range(len(prompts))],
                       copy_guard=guard)
            found["ordinary"] += [r.copy_guard for r in out.provenance]
        chosen = slice(a.item_offset, a.item_offset + a.items)
        paths = [pth for pth in db.metadata.column("path").to_pylist()[chosen] if pth]
        captions = db.metadata.column("caption").to_pylist()[chosen]
        for i, (path, caption) in enumerate(zip(paths, captions)):
            ref = pipe(prompt=caption or "a picture", refs=[(path, 8.0)], seed=i, copy_guard=guard,
                       copy_sources=[(db, 1.0)])
            found["copy (ref x8)"].append(ref.provenance[0].copy_guard)
            for strength in (0.15, 0.3):
                init = pipe(init_image=path, strength=strength, databases=db, seed=i, copy_guard=guard)
                found[f"copy (init {strength:g})"].append(init.provenance[0].copy_guard)
            item = Image.open(path).convert("RGB")
            copies = duplicates(item)
            v = pipe.embedder.encode_images([item] + copies)
            for j, dup in enumerate(copies):
                found["duplicates"].append({"similarity": float(v[0] @ v[j + 1]),
                                            "pixel_distance": pixel_distance(dup, item)})
    print(f"{a.model} with {a.databases} ({', '.join(a.styles)}); prompts {a.content_offset}..+{a.contents}, "
          f"seeds {a.seeds}")
    print("| outputs | n | similarity p5 / p50 / p95 / max | pixel distance min / p5 / p50 | " +
          " | ".join(f"similarity >= {t:g}" for t in a.thresholds) + f" | pixels <= {PIXEL_THRESHOLD:g} | "
          f"flagged by the guard (>= {DEFAULT_THRESHOLD:g} or pixels <= {PIXEL_THRESHOLD:g}) |")
    print("|---|---:|---:|---:|" + "---:|" * (len(a.thresholds) + 2))
    for name, rows in found.items():
        sims = np.array([r["similarity"] for r in rows], np.float64)
        dists = np.array([r["pixel_distance"] for r in rows if r.get("pixel_distance") is not None], np.float64)
        pct = lambda x, q: f"{np.percentile(x, q):.3f}" if len(x) else "-"  # noqa: E731
        flags = [f"{100 * np.mean(sims >= t):.1f}%" for t in a.thresholds]
        pix = f"{100 * np.mean(dists <= PIXEL_THRESHOLD):.1f}%" if len(dists) else "-"
        guarded = np.mean([r["similarity"] >= DEFAULT_THRESHOLD or (r.get("pixel_distance") is not None and
                                                                   r["pixel_distance"] <= PIXEL_THRESHOLD)
                           for r in rows])
        print(f"| {name} | {len(rows)} | {pct(sims, 5)} / {pct(sims, 50)} / {pct(sims, 95)} / {sims.max():.3f} | "
              f"{(f'{dists.min():.3f}' if len(dists) else '-')} / {pct(dists, 5)} / {pct(dists, 50)} | "
              + " | ".join(flags) + f" | {pix} | {100 * guarded:.1f}% |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
