"""Warming a database's hot files into the page cache (what `rdm serve` does when it opens one)."""

import os
import time
import warnings

import numpy as np
import pytest

from rdm import api
from rdm.db import warm
from rdm.db.database import Database
from rdm.db.faiss_index import normalise
from rdm.db.retrieval import DatabaseRegistry


def cached(path) -> bool:
    """Whether every page of the file is in the page cache: a RWF_NOWAIT read fails on the first that is not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf, offset, tries = bytearray(1 << 20), 0, 0
        while True:
            try:
                n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:  # not cached, or a page locked for a moment (readahead, writeback): retried
                tries += 1
                if tries > 5:
                    return False
                time.sleep(0.05)
                continue
            if n == 0:
                return True
            offset += n
    finally:
        os.close(fd)


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def ivf_db(tmp_path, tiny_clip, home):
    rng = np.random.default_rng(0)
    vectors = normalise(rng.standard_normal((6000, 32)).astype(np.float32))
    np.save(tmp_path / "vecs.npy", vectors)
    api.build_index(str(tmp_path / "vecs.npy"), name="warm", clip=tiny_clip, indexes=str(home), progress=False,
                    index_factory="IVF16,PQ8")
    db = Database.open("warm", home)
    shares = [db.path / s.entry["files"]["index"]["name"] for s in db.segments]
    vecs = [db.path / s.entry["files"]["vectors"]["name"] for s in db.segments]
    return db, shares, vecs


def test_warming_reads_the_shares_then_the_vectors_into_the_page_cache(ivf_db):
    db, shares, vecs = ivf_db
    # the vectors are never mapped, so the advice evicts them (a share may still be mapped by an index the build
    # left to the garbage collector); pages in flight under heavy I/O elsewhere may take a few tries
    for _ in range(10):
        for f in shares + vecs:
            evict(f)
        evicted = not any(cached(f) for f in vecs)
        if evicted:
            break
        time.sleep(0.2)
    w = db.warm()
    assert w.wait(60) and w.complete, w.summary()
    assert w.done == shares + vecs and w.read == w.total == sum(f.stat().st_size for f in shares + vecs)
    assert all(cached(f) for f in shares + vecs)
    if not evicted:  # the reads above are still checked; only the page-cache effect could not be shown
        warnings.warn("the vectors could not be evicted from the page cache first (busy or in-memory file system)")
    assert db.search(db.vectors[:2], k=1).rows[:, 0].tolist() == [0, 1]


def test_warming_reads_only_what_fits_and_a_new_generation_only_its_new_files(ivf_db, home):
    db, shares, vecs = ivf_db
    w = warm.warm(shares + vecs, budget=sum(f.stat().st_size for f in shares), background=False)
    assert w.done == shares and w.left_out == vecs and not w.complete
    assert "left out" in w.summary() and "do not fit" in w.summary()
    registry = DatabaseRegistry(home, warm=True)
    first = registry.get("warm")
    assert registry.warming["warm"].wait(60) and registry.warming["warm"].done == shares + vecs
    first.database.remove(ids=["3"])  # a new generation: same segments, a tombstone set
    second = registry.get("warm")
    assert second is not first and registry.warming["warm"].wait(60)
    assert registry.warming["warm"].files == [] and registry.warming["warm"].read == 0  # nothing read twice
    assert DatabaseRegistry(home).get("warm").database.count == 5999  # no warming unless asked
