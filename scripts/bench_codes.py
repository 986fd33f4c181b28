"""Which IVF codes let re-ranking be shallow: recall@10 over nprobe x re-ranking for several codes.

    python scripts/bench_codes.py EMB.npy [--n 1000000] [--nlist 1024] [--codes PQ96np OPQ96,PQ96np PQ192np SQ4 SQ8]

EMB.npy is bench_scale's input (`emb-structured-1000000.npy`). Every code is trained on the same
seeded sample with the same coarse centroids (rdm.db.faiss_index.train's two-level spherical k-means), filled
in memory (a code "OPQ96,PQ96np" is a rotation trained on the sample first, the centroids rotated with
it), and searched with 200 image-like and 200 text-like queries (rdm.db.faiss_index's query makers) whose
candidates are re-scored exactly, as rdm does, against exact top-10 ground truth. Prints one line per
(code, nprobe): recall@10 image / text per re-ranking depth, and the single-thread time of the
candidate search (scan ms/query). Needs N x D x 4 bytes of memory (3 GB at 1M x 768).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rdm import index as fi  # noqa: E402

RERANKS = (2, 4, 10, 30, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("emb", type=Path)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--codes", nargs="+", default=["PQ96np", "PQ192np", "SQ4", "SQ8"])
    ap.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64])
    a = ap.parse_args()
    x = np.asarray(np.load(a.emb, mmap_mode="r")[:a.n], np.float32)
    rng = np.random.default_rng(0)
    train = x[np.sort(rng.choice(len(x), min(len(x), 32 * a.nlist), replace=False))]
    sample = x[np.sort(rng.choice(len(x), 2048, replace=False))]
    queries = {"image": fi.image_like_queries(sample, 3)[:200], "text": fi.text_like_queries(sample, 3)[:200]}
    truth = {k: faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1] for k, q in queries.items()}
    coarse = fi.train(train, f"IVF{a.nlist},Flat")  # kept: the quantizer belongs to it
    centroids = faiss.extract_index_ivf(coarse).quantizer.reconstruct_n(0, a.nlist)
    threads = faiss.omp_get_max_threads()
    for code in a.codes:
        t = time.perf_counter()
        *rotation, codes = code.split(",")  # "OPQ96,PQ96np": a rotation trained first, then the IVF in its space
        index = faiss.index_factory(x.shape[1], ",".join(rotation + [f"IVF{a.nlist}", codes]), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        routed = centroids
        if rotation:
            chain = faiss.downcast_index(index).chain
            chain.at(0).train(train[:fi.CODE_TRAIN])
            routed = chain.at(0).apply(centroids)  # a rotation keeps inner products: the same lists, rotated
        ivf.quantizer.add(routed)  # the same coarse centroids for every code: only the codes are trained
        index.train(train[:fi.CODE_TRAIN])
        index.add(x)
        built = time.perf_counter() - t
        for nprobe in a.nprobes:
            ivf.nprobe = nprobe
            cells = []
            for rerank in RERANKS:
                rec = []
                for kind in ("image", "text"):
                    _, cand = index.search(queries[kind], 10 * rerank)
                    scores = np.einsum("qd,qkd->qk", queries[kind], x[np.maximum(cand, 0)])
                    scores[cand < 0] = -np.inf
                    rec.append(fi.recall_at_k(np.take_along_axis(cand, np.argsort(-scores, 1)[:, :10], 1), truth[kind]))
                cells.append(f"{rerank}x {rec[0]:.3f}/{rec[1]:.3f}")
            faiss.omp_set_num_threads(1)
            t = time.perf_counter()
            index.search(queries["text"][:100], 100)
            scan = (time.perf_counter() - t) * 10
            faiss.omp_set_num_threads(threads)
            print(f"{code} nprobe {nprobe}: " + "  ".join(cells) + f"  scan {scan:.2f} ms/query  build {built:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
