#!/usr/bin/env python
"""Recall@10 of a database's IVF shares over nprobe x re-ranking, against a streamed exact pass.

    python scripts/recall_sweep.py /path/to/indexes/NAME [--queries 64] [--nprobes 16 64 256] [--reranks 10 30 100 300]

Works on a committed database or on a build folder whose index stage finished encoding but not tuning
(segments/*/index.TAG.faiss and trained.TAG.faiss present): it reads the files directly. The queries
are the build tuner's two sets (rdm.db.faiss_index.image_like_queries / text_like_queries over a seeded sample),
so the table says which of probing or re-ranking limits the tuned recall. One thread, as a single query
runs; prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import faiss
import numpy as np

from rdm.db import faiss_index as fi
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db", type=Path)
    p.add_argument("--queries", type=int, default=64, help="queries per set")
    p.add_argument("--nprobes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--reranks", type=int, nargs="+", default=[10, 30, 100, 300])
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args()
    faiss.omp_set_num_threads(1)
    segs = sorted(glob.glob(str(a.db / "segments" / "s*")))
    trained_path = sorted(glob.glob(str(a.db / "trained.*.faiss")))[-1]
    tag = Path(trained_path).name.removeprefix("trained.")
    vec = [np.load(f"{s}/vectors.npy", mmap_mode="r") for s in segs]
    offs = np.cumsum([0] + [len(v) for v in vec])

    def rows(r: np.ndarray) -> np.ndarray:
        seg = np.searchsorted(offs, r, "right") - 1
        return np.stack([vec[s][i - offs[s]] for s, i in zip(seg, r)]).astype(np.float32)

    rng = np.random.default_rng(a.seed)
    base = rows(np.sort(rng.choice(offs[-1], 4 * a.queries, replace=False)))
    sets = {"image": fi.image_like_queries(base, 0)[:a.queries], "text": fi.text_like_queries(base, 0)[:a.queries]}
    q = np.concatenate(list(sets.values()))
    t = time.time()
    best_s, best_r = np.full((len(q), 10), -np.inf, np.float32), np.full((len(q), 10), -1, np.int64)
    for i, v in enumerate(vec):  # exact ground truth, one segment at a time
        s, r = fi.exact_topk(q, np.asarray(v, np.float32), 10)
        best_s, best_r = fi.merge_topk(np.concatenate([best_s, s], 1), np.concatenate([best_r, r + offs[i]], 1), 10)
    print(json.dumps({"ground_truth_s": round(time.time() - t), "vectors": int(offs[-1])}), flush=True)
    stacked = fi.StackedIndex(faiss.read_index(trained_path), [f"{s}/index.{tag}" for s in segs], int(offs[-1]))
    for nprobe in a.nprobes:
        for rerank in a.reranks:
            t = time.time()
            cand = stacked.search(q, 10 * rerank, nprobe)
            scan_ms = 1000 * (time.time() - t) / len(q)
            sims = np.full(cand.shape, -np.inf, np.float32)
            for j in range(len(q)):
                ok = cand[j] >= 0
                sims[j, ok] = rows(cand[j][ok]) @ q[j]
            found = fi.merge_topk(sims, cand, 10)[1]
            recall = {name: round(fi.recall_at_k(found[i * a.queries:(i + 1) * a.queries],
                                                 best_r[i * a.queries:(i + 1) * a.queries]), 3)
                      for i, name in enumerate(sets)}
            print(json.dumps({"nprobe": nprobe, "rerank": rerank, **recall, "scan_ms_per_query": round(scan_ms, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
