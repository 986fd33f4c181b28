"""The build-time tuner: the cheapest (nprobe, rerank) that reaches the recall target on every query set."""

import numpy as np

from rdm.db import faiss_index as fi


def fake_search(recall_of):
    """A search whose recall@10 is recall_of(nprobe, rerank): it finds that share of the true rows."""
    truth = np.arange(100 * 10).reshape(100, 10)

    def search(queries, k, spec):
        found = truth.copy()
        hits = int(round(recall_of(spec.nprobe, spec.rerank) * k))
        found[:, hits:] = -1
        return found
    return search, {"image": (np.zeros((100, 4), np.float32), truth), "text": (np.zeros((100, 4), np.float32), truth)}


def test_tuning_picks_the_cheapest_setting_that_reaches_the_target():
    # recall reaches 1.0 at nprobe 64 with any rerank, or at nprobe 8 with rerank >= 30
    search, sets = fake_search(lambda nprobe, rerank: 1.0 if nprobe >= 64 or (nprobe >= 8 and rerank >= 30) else 0.5)
    spec = fi.IndexSpec(factory="IVF1024,PQ8")
    fi.tune(spec, 1024, search, sets, list_size=1000)
    # costs: (64, 4) = 64000 + 4000 = 68000; (8, 30) = 8000 + 30000 = 38000; (8, 100) dearer
    assert (spec.nprobe, spec.rerank) == (8, 30)
    assert spec.recall_image == spec.recall_text == spec.recall_at_10 == 1.0

    # with tiny lists, scanning is cheap and re-scoring dominates: many lists, few candidates
    spec = fi.IndexSpec(factory="IVF1024,PQ8")
    fi.tune(spec, 1024, search, sets, list_size=10)
    assert (spec.nprobe, spec.rerank) == (64, 4)


def test_tuning_that_cannot_reach_the_target_says_so():
    search, sets = fake_search(lambda nprobe, rerank: 0.8)
    spec = fi.IndexSpec(factory="IVF64,PQ8")
    fi.tune(spec, 64, search, sets, list_size=100)
    assert spec.recall_at_10 == 0.8 and spec.nprobe == 64 and spec.rerank == fi.RERANKS[-1]
