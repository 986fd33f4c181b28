"""How long does `rdm curate` take, and how much memory, at 100k and 1M vectors?

    python scripts/bench_curate.py --sizes 100000 1000000 --work /path/with/disk

Synthetic clustered 768-d unit vectors (scripts/bench_scale.py's make_vectors, the "structured" data), built with
`rdm build-index emb.npy` (an IVF index above 100k items, as rdm chooses), then `rdm curate bench --json --out`
in its own process: wall time and peak RSS (os.wait4), and what it found. Which CPU the figures come from is
printed first. The build is timed too but is not part of curation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import cpu_name, in_child, make_clip, make_vectors, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "curate_bench.csv",
                    help="also write the table here (default scripts/results/curate_bench.csv)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    clip = a.work / "clip768"
    if not (clip / "open_clip_config.json").is_file():
        in_child(make_clip, clip)
    print(f"CPU: {cpu_name()}", flush=True)
    rows = []
    for size in a.sizes:
        env = dict(os.environ, RDM_INDEXES=str(a.work / f"indexes-{size}"))
        emb = a.work / f"emb-structured-{size}.npy"
        if not emb.is_file():
            in_child(make_vectors, emb, size, "structured")
        rdm = [sys.executable, "-m", "rdm.cli"]
        r = {"size": size}
        if not (a.work / f"indexes-{size}" / "bench" / "manifest.json").is_file():
            b = run(rdm + ["build-index", str(emb), "--name", "bench", "--clip", f"local-dir:{clip}"], env)
            r["build_s"] = b["seconds"]
        c = run(rdm + ["curate", "bench", "--json", "--quiet", "--out", str(a.work / f"curate-{size}")], env)
        found = json.loads(c["stdout"])
        r.update(curate_s=c["seconds"], curate_rss_gb=c["rss_gb"], groups=len(found["duplicate_groups"]),
                 duplicates=sum(len(g["drop"]) for g in found["duplicate_groups"]), outliers=len(found["outliers"]))
        rows.append(r)
        print(json.dumps(r), flush=True)
    ap_csv = a.csv
    if ap_csv:  # the table as CSV next to this script (scripts/results/), with the CPU it came from
        import csv

        ap_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(ap_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["items", "curate_s", "curate_peak_rss_gb", "duplicate_groups", "outliers", "cpu"])
            for r in rows:
                w.writerow([r["size"], round(r["curate_s"], 1), round(r["curate_rss_gb"], 2), r["groups"],
                            r["outliers"], cpu_name()])
    print("| items | build s | curate s | curate peak RSS GB | duplicate groups | outliers |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']:,} | {r.get('build_s', float('nan')):.0f} | {r['curate_s']:.0f} | "
              f"{r['curate_rss_gb']:.2f} | {r['groups']} | {r['outliers']} |")


if __name__ == "__main__":
    main()
