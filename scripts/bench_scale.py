"""Databases at scale: build, open, info, remove, append, compact and search at 1M and 10M x 768 vectors.

    python scripts/bench_scale.py --sizes 1000000 10000000 --work /path/with/disk [--baseline df1196e] [--data isotropic]
    python scripts/bench_scale.py --sizes 10000000 --work /path/with/disk --search-only   # after a change to the search

Synthetic clustered unit vectors (10k clusters; `--data structured`, the default, or `isotropic`: see
make_vectors; stored as float16
.npy to halve the input's disk) are built with `rdm build-index emb.npy` (a 768-d open_clip model in
local-dir format stands in for CLIP: precomputed vectors embed nothing). Every step runs in its own
process, timed and with its peak RSS read from os.wait4. `--baseline COMMIT` runs the same steps at
the smallest size with that commit's rdm (git worktree), in the same run, for the ratios. Results
are appended as JSON lines to WORK/results.jsonl (a killed run keeps what it measured) and printed
as a table. Which CPU the figures come from is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 768
CLUSTERS = 10_000
LATENT = 32  # structured data: dimensions of the latent space the clusters live in
CONE = 0.55  # structured data: cosine of every vector's latent part to the shared mean direction


def cpu_name() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name"))
        avx = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
        # FAISS_SIMD_LEVEL=AVX2 (faiss' dynamic dispatch) with NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL
        # AVX512_SPR" runs the search code paths of an AVX2-only machine on an AVX-512 one
        simd = os.environ.get("FAISS_SIMD_LEVEL", "best available")
        return f"{model}, {os.cpu_count()} cores, {avx}; faiss SIMD level: {simd}"
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_vectors(path: Path, n: int, data: str = "structured", seed: int = 0, chunk: int = 250_000) -> None:
    """n clustered unit vectors (float16 .npy), written chunk by chunk (bounded memory; chunk i has its own
    seeded generator, so a file is the same however it is cut).

    structured: 10k clusters (1000 topics x 10 sub-clusters) in a 32-dimensional latent space, in a cone
      around a shared mean direction (mean pairwise cosine ~0.29), plus a little isotropic noise in all
      768 dimensions: local structure, as embeddings of real images have (neighbours are meaningfully
      closer than the rest). Text-like queries made from it sit at cosine ~0.30 of their nearest image.
    isotropic: 10k random centres plus isotropic noise (cosine ~0.86 to the centre): a cluster's members
      are an unstructured cloud in 768 dimensions, so neighbours within it are nearly equidistant and a
      query offset along any direction re-orders them by that direction's noise (the stress case).
    """
    if path.is_file():
        return
    rng = np.random.default_rng(seed)
    if data == "isotropic":
        centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    elif data == "structured":
        basis = np.linalg.qr(rng.standard_normal((DIM, LATENT + 1)))[0].T.astype(np.float32)  # orthonormal rows
        mean, basis = basis[0], basis[1:]
        topics = rng.standard_normal((CLUSTERS // 10, LATENT)).astype(np.float32)
        centres = topics[np.arange(CLUSTERS) // 10] + 0.5 * rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
    else:
        raise SystemExit(f"unknown --data {data!r}: structured or isotropic")
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, DIM))
    for i, lo in enumerate(range(0, n, chunk)):
        m = min(chunk, n - lo)
        r = np.random.default_rng([seed, i])
        noise = r.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        if data == "isotropic":
            x = centres[r.integers(0, CLUSTERS, m)] + 0.6 * noise
        else:
            z = centres[r.integers(0, CLUSTERS, m)] + 0.35 * r.standard_normal((m, LATENT), dtype=np.float32)
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            x = CONE * mean + np.sqrt(1 - CONE ** 2) * (z @ basis) + 0.25 * noise
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(tmp, path)


def make_append(path: Path, n: int = 10_000, seed: int = 1) -> None:
    """n new vectors with new ids, as a parquet of (id, embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
    pq.write_table(pa.table({"id": [f"new-{i}" for i in range(n)], "embedding": emb}), path)


def in_child(fn, *args) -> None:
    """Run fn(*args) in a spawned process: a forked child inherits its parent's peak RSS (Linux carries
    the high-water mark across fork and exec), so the driver itself must stay small for os.wait4's
    figures to be the steps' own."""
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=fn, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{fn.__name__}{args} failed ({p.exitcode})")


def make_queries(emb: Path, size: int, path: Path) -> None:
    from rdm.db.faiss_index import image_like_queries, text_like_queries
    from rdm.db.segment import read_npy_picks

    sample = read_npy_picks(emb, np.sort(np.random.default_rng(5).choice(size, 4096, replace=False)))
    sample = sample.astype(np.float32)
    fresh = np.concatenate([image_like_queries(sample, 4)[:150], text_like_queries(sample, 4)[:150]])
    np.savez(path, image=image_like_queries(sample, 3), text=text_like_queries(sample, 3), latency=fresh)


def run(cmd: list[str], env: dict) -> dict:
    """Run a command; its wall time, peak RSS (os.wait4) and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=env.get("PYTHONPATH"))  # that rdm, not ./rdm
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return {"seconds": seconds, "rss_gb": usage.ru_maxrss / 2 ** 20, "stdout": stdout}


PROBE = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from rdm.db.database import Database
home, name, what = sys.argv[1], sys.argv[2], sys.argv[3]
rng = np.random.default_rng(5)
q = rng.standard_normal((1, 768)).astype(np.float32)
db = Database.open(name, home)
if what == "open":
    db.search(q, k=10)
    print(json.dumps({"seconds_in": time.perf_counter() - t0}))
elif what == "remove10k":
    ids = [str(i) for i in rng.choice(db.count - 10, 10000, replace=False) + 7]  # ids 7 .. count - 3: all live
    t = time.perf_counter(); db.remove(ids=ids); print(json.dumps({"seconds_in": time.perf_counter() - t}))
elif what == "check-removed":
    gone, emb = sys.argv[4], sys.argv[5]
    vec = np.asarray(np.load(emb, mmap_mode="r")[int(gone)], np.float32)[None]  # the removed item's own vector
    hits = db.search(vec, k=10).hits(0)
    print(json.dumps({"returned_removed": any(h["id"] == gone for h in hits)}))
elif what == "search":
    from rdm.db.faiss_index import recall_at_k
    qfile = np.load(sys.argv[4])  # the same queries for every design (made by the driver)
    sets = {"image": qfile["image"], "text": qfile["text"]}
    out = {}
    batch = np.concatenate([sets["image"], sets["text"]])
    fresh = qfile["latency"] if "latency" in qfile else batch[:300]  # queries not searched before in this process

    def latency(queries, key):
        lat = []
        for x in queries:
            t = time.perf_counter(); db.search(x[None], k=10); lat.append(time.perf_counter() - t)
        out[f"p50{key}_ms"], out[f"p99{key}_ms"] = float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3)

    latency(fresh[0::2], "")  # the page cache as earlier steps left it (a one-shot `rdm search`)
    if hasattr(db, "warm"):  # what `rdm serve` does once per database: its hot files read into the page cache
        t = time.perf_counter(); w = db.warm(background=False)
        out["warm_s"], out["warm_gb"], out["warm_complete"] = time.perf_counter() - t, w.read / 1e9, w.complete
    t = time.perf_counter(); db.search(batch, k=10, records=False) if "records" in Database.search.__code__.co_varnames else db.search(batch, k=10)
    out["batched_qps"] = len(batch) / (time.perf_counter() - t)
    latency(fresh[1::2], "_warm")  # other fresh queries, after the warm-up (a running service)
    for kind, qs in sets.items():
        found = db.search(qs, k=10).rows
        if hasattr(db, "_exact_search"):
            truth = db._exact_search(qs, 10, None)[1]
        else:
            from rdm.db.faiss_index import exact_topk
            truth = exact_topk(qs, db.vectors, 10)[1]
        out[f"recall_{kind}"] = recall_at_k(found, truth)
    print(json.dumps(out))
"""


def _open_info_remove(r: dict, py: list, rdm: list, home: str, name: str, emb: Path, env: dict) -> None:
    o = run(py + ["-c", PROBE, home, name, "open"], env)
    r["open_search_s"], r["open_rss_gb"], r["open_search_in_s"] = o["seconds"], o["rss_gb"], json.loads(o["stdout"])["seconds_in"]
    i = run(rdm + ["info", name], env)
    r["info_s"], r["info_rss_gb"] = i["seconds"], i["rss_gb"]
    rm = run(rdm + ["remove", "--db", name, "3"], env)
    r["remove1_s"], r["remove1_rss_gb"] = rm["seconds"], rm["rss_gb"]
    r["removed_returned"] = json.loads(run(py + ["-c", PROBE, home, name, "check-removed", "3", str(emb)], env)["stdout"])["returned_removed"]


def bench(size: int, work: Path, code: Path, label: str, env: dict, steps: set[str], data: str) -> dict:
    """All steps at one size with the rdm at `code`; returns the figures."""
    folder = label.split(" (")[0].split(" [")[0]  # "segments (search rerun)" searches the "segments" database
    env = dict(env, PYTHONPATH=str(code), RDM_INDEXES=str(work / f"indexes-{folder}-{data}-{size}"))
    emb, extra = work / f"emb-{data}-{size}.npy", work / "append-10k.parquet"
    if not emb.is_file():
        in_child(make_vectors, emb, size, data)
    if not extra.is_file():
        in_child(make_append, extra)
    clip = env["BENCH_CLIP"]
    py = [sys.executable]
    rdm = py + ["-m", "rdm.cli"]
    home, name = env["RDM_INDEXES"], "bench"
    r: dict = {"label": label, "size": size, "data": data}
    if not (Path(home) / name / "manifest.json").is_file():
        b = run(rdm + ["build-index", str(emb), "--name", name, "--clip", clip], env)
        r["build_s"], r["build_rss_gb"] = b["seconds"], b["rss_gb"]
        r["build_summary"] = b["stdout"].strip().splitlines()[-3:]
    r["disk_gb"] = sum(p.stat().st_size for p in (Path(home) / name).rglob("*") if p.is_file()) / 1e9
    if steps == {"search-only"}:  # a database measured before: search again (after a change to the search)
        steps = {"search"}
    else:
        steps = steps | {"writes"}
    if "writes" in steps:
        _open_info_remove(r, py, rdm, home, name, emb, env)
    if "search" in steps:
        queries = work / f"queries-{data}-{size}.npz"
        if not queries.is_file():
            in_child(make_queries, emb, size, queries)
        s = run(py + ["-c", PROBE, home, name, "search", str(queries)], env)
        r.update(json.loads(s["stdout"]))
    if "writes" not in steps:
        return r
    rm10 = run(py + ["-c", PROBE, home, name, "remove10k"], env)
    r["remove10k_s"], r["remove10k_rss_gb"] = rm10["seconds"], rm10["rss_gb"]
    a = run(rdm + ["build-index", str(extra), "--name", name, "--clip", clip, "--append"], env)
    r["append10k_s"], r["append10k_rss_gb"] = a["seconds"], a["rss_gb"]
    if "compact" in steps and label != "baseline":  # the monolithic design has no compaction
        c = run(rdm + ["compact", name, "--quiet"], env)
        r["compact_s"], r["compact_rss_gb"] = c["seconds"], c["rss_gb"]
    return r


COLUMNS = [("build_s", "build s"), ("build_rss_gb", "build RSS GB"), ("disk_gb", "disk GB"),
           ("open_search_s", "open+search s"), ("open_rss_gb", "open RSS GB"), ("info_s", "info s"),
           ("remove1_s", "remove 1 s"), ("remove1_rss_gb", "remove RSS GB"), ("removed_returned", "removed returned"),
           ("remove10k_s", "remove 10k s"), ("append10k_s", "append 10k s"), ("compact_s", "compact s"),
           ("compact_rss_gb", "compact RSS GB"), ("p50_ms", "p50 ms as found"), ("p99_ms", "p99 ms as found"),
           ("warm_s", "warm-up s"), ("warm_gb", "warm-up GB"), ("batched_qps", "batched q/s"),
           ("p50_warm_ms", "p50 ms warm"), ("p99_warm_ms", "p99 ms warm"),
           ("recall_image", "recall@10 image"), ("recall_text", "recall@10 text")]


def table(rows: list[dict]) -> str:
    head = "| figure | " + " | ".join(f"{r['label']} {r.get('data', 'isotropic')} {r['size'] / 1e6:g}M" for r in rows) + " |"
    lines = [head, "|" + "---|" * (len(rows) + 1)]
    for key, title in COLUMNS:
        cells = []
        for r in rows:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    base = next((r for r in rows if r["label"] != "segments"), None)
    new = next((r for r in rows if r["label"] == "segments" and base and r["size"] == base["size"]), None)
    if base and new:
        lines.append("| **ratio baseline / segments** | | |")
        for key, title in COLUMNS:
            if isinstance(base.get(key), float) and isinstance(new.get(key), float) and new[key] > 0 \
                    and key not in ("batched_qps", "recall_image", "recall_text", "disk_gb"):
                lines.append(f"| {title} | {base[key] / new[key]:.1f}x | |")
    return "\n".join(lines)


def make_clip(clip_dir: Path) -> None:
    sys.path.insert(0, str(REPO))
    from rdm.models.tiny import TINY_CLIP_CFG, make_tiny_clip

    make_tiny_clip(clip_dir, model_cfg=dict(TINY_CLIP_CFG, embed_dim=DIM))


def main() -> None:
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--work", type=Path, required=True, help="folder for inputs and databases (needs disk)")
    ap.add_argument("--baseline", default=None, help="git commit of the design to compare at the smallest size")
    ap.add_argument("--no-compact-above", type=int, default=None, help="skip compaction above this size")
    ap.add_argument("--data", choices=("structured", "isotropic"), default="structured",
                    help="the synthetic vectors (see make_vectors)")
    ap.add_argument("--table-only", action="store_true", help="print the table of WORK/results.jsonl")
    ap.add_argument("--search-only", action="store_true",
                    help="measure only the search of databases built before (after a change to the search)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    if args.table_only:
        print(table([json.loads(line) for line in results.read_text().splitlines() if line.strip()]))
        return
    print(f"CPU: {cpu_name()}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2)))
    clip_dir = args.work / "clip768"
    if not (clip_dir / "open_clip_config.json").is_file():
        in_child(make_clip, clip_dir)
    env["BENCH_CLIP"] = f"local-dir:{clip_dir.resolve()}"
    rows = []
    plan = []
    if args.baseline:
        tree = args.work / f"baseline-{args.baseline}"
        if not tree.is_dir():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline], check=True)
        plan.append(("baseline", min(args.sizes), tree))
    plan += [("segments", n, REPO) for n in sorted(args.sizes)]
    for label, size, code in plan:
        steps = {"search"}
        if args.no_compact_above is None or size <= args.no_compact_above:
            steps.add("compact")
        if args.search_only:
            steps = {"search-only"}
            label += " (search rerun)"
        if os.environ.get("FAISS_SIMD_LEVEL"):
            label += f" [faiss {os.environ['FAISS_SIMD_LEVEL']}]"
        print(f"== {label} {size:,}", flush=True)
        r = bench(size, args.work, code, label, env, steps, args.data)
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
