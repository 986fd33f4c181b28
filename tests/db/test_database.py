import json
import os
from pathlib import Path

import numpy as np
import pytest

from rdm import api
from rdm.db import segment, store
from rdm.db.database import Database
from rdm.db.faiss_index import exact_topk, image_like_queries, normalise, recall_at_k, text_like_queries
from rdm.errors import DatabaseBusy, DatabaseCorrupt, DatabaseError, RDMError
from tests.helpers.world import make_folder


def build(source, name, clip, home, **kw):
    kw.setdefault("workers", 0)
    return api.build_index(str(source), name=name, clip=clip, indexes=str(home), progress=False, **kw)


def test_every_item_is_its_own_nearest_neighbour(pictures, tiny_clip, home):
    root, names = pictures
    build(root, "pics", tiny_clip, home, batch_size=5)
    db = Database.open("pics", home)
    assert sorted(db.ids) == names
    res = db.search(db.vectors, k=3)
    assert [db.ids[r] for r in res.rows[:, 0]] == db.ids
    assert np.allclose(res.scores[:, 0], 1.0, atol=1e-5)
    # the neighbours come back with their exact stored vectors
    assert np.array_equal(res.embeddings()[:, 0], db.vectors)


def test_vectors_are_read_by_pread_whatever_the_page_cache_holds(pictures, tiny_clip, home, monkeypatch):
    root, _ = pictures
    build(root, "pics", tiny_clip, home, batch_size=5, checkpoint_every=1)  # several segments
    db = Database.open("pics", home)
    assert len(db.segments) > 1
    stored = np.concatenate([np.load(home / "pics" / s.entry["files"]["vectors"]["name"]) for s in db.segments])
    rows = np.array([[len(db.ids) - 1, 0, -1], [3, 3, 1], [4, 5, 6]])
    expected = np.where((rows >= 0)[..., None], stored[np.maximum(rows, 0)], 0)
    assert np.array_equal(db.vectors_at(rows), expected)
    # rows the page cache does not hold are read by the pool of reader threads: the same bytes
    calls = []

    def not_cached(fd, buffers, offset, flags=0):
        calls.append(flags)
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError(11, "would block")
        return real(fd, buffers, offset)

    real = os.preadv
    monkeypatch.setattr(segment.os, "preadv", not_cached)
    assert np.array_equal(db.vectors_at(rows), expected)
    assert os.RWF_NOWAIT in calls and 0 in calls
    # and a search process maps no vector file at all
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert "vectors.npy" not in maps


def test_filters_apply_inside_the_search(tmp_path, tiny_clip, home):
    root = tmp_path / "styled"
    names = make_folder(root, 20)
    rows = [{"file_name": n, "caption": f"picture {i}", "style": "neon" if i % 5 == 0 else "flat", "year": 1900 + i}
            for i, n in enumerate(names)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    build(root, "styled", tiny_clip, home)
    db = Database.open("styled", home)
    query = db.vectors[1:2]  # a flat item: its unfiltered top-4 holds few or no neon items
    res = db.search(query, k=4, where=["style=neon"])
    hits = res.hits(0)
    assert len(hits) == 4 and all(h["style"] == "neon" for h in hits)
    assert {h["id"] for h in hits} == {n for n, r in zip(names, rows) if r["style"] == "neon"}
    # any of several values of one column; integer columns compare as text; captions kept
    both = db.search(query, k=20, where={"style": ["neon", "flat"], "year": ["1901"]}).hits(0)
    assert [h["id"] for h in both] == [names[1]] and both[0]["caption"] == "picture 1"
    with pytest.raises(RDMError, match="no column 'colour'"):
        db.search(query, k=2, where=["colour=red"])


def test_k_larger_than_count_never_indexes_metadata_with_minus_one(pictures, tiny_clip, home):
    root, names = pictures
    build(root, "pics", tiny_clip, home)
    db = Database.open("pics", home)
    res = db.search(db.vectors[:2], k=len(names) + 5)
    assert (res.rows[:, len(names):] == -1).all()
    assert all(len(res.hits(q)) == len(names) for q in range(2))
    assert np.isneginf(res.scores[:, len(names):]).all()
    assert (res.embeddings()[:, len(names):] == 0).all()
    filtered = db.search(db.vectors[:1], k=5, where=["id=" + names[3]])
    assert [h["id"] for h in filtered.hits(0)] == [names[3]]
    nothing = db.search(db.vectors[:1], k=5, where=["id=not-there"])
    assert (nothing.rows == -1).all() and nothing.hits(0) == []


def test_nan_and_dimension_mismatch_rejected(pictures, tiny_clip, home, tmp_path):
    root, _ = pictures
    build(root, "pics", tiny_clip, home)
    db = Database.open("pics", home)
    bad = db.vectors[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(RDMError, match="NaN or Inf"):
        db.search(bad, k=2)
    with pytest.raises(RDMError, match="dimension mismatch"):
        db.search(np.ones((1, 7), np.float32), k=2)
    with pytest.raises(RDMError, match="NaN or Inf"):
        db.add(bad, [{"id": "x"}, {"id": "y"}])
    vectors = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    vectors[4] = np.inf
    np.save(tmp_path / "vecs.npy", vectors)
    with pytest.raises(RDMError, match="NaN or Inf"):
        build(tmp_path / "vecs.npy", "vecs", tiny_clip, home)


def _flip(path):
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    return original


def test_corrupted_files_give_rebuild_message(pictures, tiny_clip, home, monkeypatch):
    root, _ = pictures
    build(root, "pics", tiny_clip, home)
    manifest = json.loads((home / "pics" / "manifest.json").read_text())
    seg = manifest["segments"][0]["files"]
    for kind in ("vectors", "metadata", "skipped", "keys"):
        path = home / "pics" / seg[kind]["name"]
        original = _flip(path)
        with pytest.raises(DatabaseCorrupt, match="database pics is corrupt: .*rebuild it"):
            Database.open("pics", home)  # a small database: every digest is checked when it is opened
        with pytest.raises(DatabaseCorrupt, match="does not match its checksum"):
            api.verify("pics", str(home))
        path.write_bytes(original)
    path.write_bytes(original[:-1])  # a truncated file is caught by its size, whatever the database's size
    monkeypatch.setattr("rdm.db.database.VERIFY_ON_OPEN", 0)
    with pytest.raises(DatabaseCorrupt, match="has .* bytes, the manifest says"):
        Database.open("pics", home)
    path.write_bytes(original)
    # a large database is not hashed at open: its metadata is checked when first read, the rest by verify
    meta = home / "pics" / seg["metadata"]["name"]
    original = _flip(meta)
    db = Database.open("pics", home)
    with pytest.raises(DatabaseCorrupt, match="metadata.parquet does not match its checksum"):
        db.search(db.vectors_at([0]), k=1)
    meta.write_bytes(original)
    vec = home / "pics" / seg["vectors"]["name"]
    original = _flip(vec)
    Database.open("pics", home)
    with pytest.raises(DatabaseCorrupt, match="vectors.npy does not match its checksum"):
        Database.open("pics", home).verify()
    vec.write_bytes(original)
    assert Database.open("pics", home).verify()["ok"]
    (home / "pics" / "manifest.json").write_text("{ not json")
    with pytest.raises(DatabaseCorrupt, match="database pics is corrupt"):
        Database.open("pics", home)


def test_missing_database_lists_existing(pictures, tiny_clip, home):
    root, _ = pictures
    build(root, "pics", tiny_clip, home)
    with pytest.raises(DatabaseError, match="no database 'nope'.*existing: pics"):
        Database.open("nope", home)


def test_concurrent_writer_is_refused(pictures, tiny_clip, home):
    root, _ = pictures
    with store.writer_lock(home / "pics", "pics"):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            err = pool.apply(_try_lock, (str(home / "pics"),))
    assert "being written by pid" in err


def _try_lock(path):
    from pathlib import Path

    try:
        with store.writer_lock(Path(path), "pics"):
            return "acquired"
    except DatabaseBusy as e:
        return str(e)


def test_existing_database_needs_append_or_overwrite(pictures, tiny_clip, home):
    root, _ = pictures
    build(root, "pics", tiny_clip, home)
    with pytest.raises(DatabaseError, match="already exists.*--append.*--overwrite"):
        build(root, "pics", tiny_clip, home)
    report = build(root, "pics", tiny_clip, home, overwrite=True)
    assert report.total == 24


def test_append_adds_only_new_items(tmp_path, tiny_clip, home):
    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, 6, seed=1)
    make_folder(b, 9, seed=1)  # the same first 6 pictures plus 3 new ones
    build(a, "grow", tiny_clip, home)
    report = build(b, "grow", tiny_clip, home, append=True)
    db = Database.open("grow", home)
    assert report.embedded == 3 and db.count == 9 and len(set(db.ids)) == 9  # only the new ones embedded
    assert len(db.manifest["sources"]) == 2
    res = db.search(db.vectors, k=1)
    assert (res.rows[:, 0] == np.arange(9)).all()


def test_remove_by_id_and_by_filter(tmp_path, tiny_clip, home):
    root = tmp_path / "takedown"
    names = make_folder(root, 10)
    rows = [{"file_name": n, "licence": "cc0" if i < 7 else "restricted"} for i, n in enumerate(names)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    build(root, "take", tiny_clip, home)
    db = Database.open("take", home)
    gone_vec = db.vectors[db.ids.index(names[2])].copy()
    assert db.remove(ids=[names[2]]) == [names[2]]
    assert sorted(db.remove(where=["licence=restricted"])) == names[7:]
    db = Database.open("take", home)
    assert db.count == 6 and names[2] not in db.ids
    hits = db.search(gone_vec[None], k=6).hits(0)
    assert names[2] not in {h["id"] for h in hits} and len(hits) == 6
    # rows keep their numbers until compaction: removed ones are tombstones, never returned
    assert db.search(db.vectors, k=1).rows[:, 0].tolist() == db.live_rows().tolist() == [0, 1, 3, 4, 5, 6]
    with pytest.raises(RDMError, match="no item"):
        db.remove(ids=["not-there.png"])
    with pytest.raises(RDMError, match="no item"):
        db.remove(ids=[names[2]])  # already removed
    before = db.vectors.copy()
    report = db.compact()
    db = Database.open("take", home)
    assert report["removed_rows_dropped"] == 4 and db.count == 6 and db.live_rows().tolist() == list(range(6))
    assert np.array_equal(db.vectors, before) and db.manifest["tombstones"] is None
    on_disk = {p.relative_to(home / "take").as_posix() for p in (home / "take").rglob("*")
               if p.is_file() and p.suffix in (".npy", ".faiss", ".parquet")}
    assert on_disk == store.referenced_files(db.manifest)  # old segments and tombstones deleted


@pytest.mark.parametrize("bisect_max", [0, 10_000])  # every lookup by a sorted scan / by binary search
def test_ids_are_found_by_their_hash_keys_even_when_hashes_collide(tmp_path, tiny_clip, home, monkeypatch, bisect_max):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(segment, "BISECT_MAX", bisect_max)
    real = segment.id_hashes
    monkeypatch.setattr(segment, "id_hashes", lambda ids: real(ids) % np.uint64(97))  # 300 ids in 97 buckets
    vecs = normalise(np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32))
    ids = [f"item-{i:03d}" for i in np.random.default_rng(1).permutation(300)]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 32)
    pq.write_table(pa.table({"id": ids, "embedding": emb}), tmp_path / "v.parquet")
    build(tmp_path / "v.parquet", "keys", tiny_clip, home)
    db = Database.open("keys", home)
    rows = {ident: row for row, ident in enumerate(db.ids)}
    assert db.rows_of(ids) == rows
    assert db.rows_of(["item-007", "item-999"]) == {"item-007": rows["item-007"]}
    assert db.remove(ids=ids[:3]) == sorted(ids[:3], key=rows.get)
    assert db.rows_of(ids[:5]) == {i: rows[i] for i in ids[3:5]}  # removed ids are not found


@pytest.mark.parametrize("factory", ["OPQ8,IVF64,PQ8", "IVF64,PQ8", "IVF64,SQ4"])  # OPQ: the default above 200k vectors
def test_approximate_index_reaches_recall_on_image_and_text_queries(tmp_path, tiny_clip, home, factory):
    """An IVF database is tuned until recall@10 >= 0.95 on image-like and text-like queries."""
    rng = np.random.default_rng(0)
    centres = normalise(rng.standard_normal((50, 32)).astype(np.float32))
    vectors = normalise(centres[rng.integers(0, 50, 20000)] + 0.05 * rng.standard_normal((20000, 32)).astype(np.float32))
    np.save(tmp_path / "vecs.npy", vectors)
    report = build(tmp_path / "vecs.npy", "ivf", tiny_clip, home, index_factory=factory)
    db = Database.open("ivf", home)
    spec = db.spec
    assert report.recall_at_10 >= 0.95 and spec.recall_image >= 0.95 and spec.recall_text >= 0.95
    if "SQ4" in factory:  # 4 bits a dimension order candidates nearly as the vectors do: shallow re-ranking
        assert spec.rerank <= 10
    assert spec.nprobe is not None and len(db.segments) == 1 and "index" in db.segments[0].entry["files"]
    for make in (image_like_queries, text_like_queries):
        queries = make(vectors, seed=7)  # other queries than the tuning ones
        _, truth = exact_topk(queries, vectors, 10)
        batch = db.search(queries, k=10, records=False)
        assert recall_at_k(batch.rows, truth) >= 0.95
        for i in (0, 5, 99):  # a single query scans its lists in parallel (faiss parallel_mode 1): same answer
            one = db.search(queries[i:i + 1], k=10, records=False)
            assert one.rows[0].tolist() == batch.rows[i].tolist()
            np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-5)
    text = text_like_queries(vectors, seed=7)
    cos = (text * vectors[np.argmax(text @ vectors.T, 1)]).sum(1)
    assert 0.2 < np.median(cos) < 0.6  # text-like queries sit off the manifold, as CLIP's do (0.3 at 768-d)
    with pytest.raises(RDMError, match="invalid FAISS factory"):
        build(tmp_path / "vecs.npy", "bad", tiny_clip, home, index_factory="NotAnIndex")
    with pytest.raises(RDMError, match="cannot be split into segments"):
        build(tmp_path / "vecs.npy", "bad2", tiny_clip, home, index_factory="HNSW32")


def test_large_filters_search_through_the_index_with_a_selector(tmp_path, tiny_clip, home, monkeypatch):
    """Above FILTER_EXACT_MAX matching rows the index searches with an IDSelector: same hits as exact."""
    import rdm.db.database as database

    root = tmp_path / "styled"
    names = make_folder(root, 20)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "style": "neon" if i % 2 else "flat"})
                                                  for i, n in enumerate(names)))
    build(root, "styled", tiny_clip, home)
    db = Database.open("styled", home)
    exact = db.search(db.vectors[:3], k=5, where=["style=neon"])
    monkeypatch.setattr(database, "FILTER_EXACT_MAX", 0)
    via_index = db.search(db.vectors[:3], k=5, where=["style=neon"])
    assert np.array_equal(exact.rows, via_index.rows) and np.allclose(exact.scores, via_index.scores, atol=1e-6)
    assert all(h["style"] == "neon" for q in range(3) for h in via_index.hits(q))


def test_a_build_of_precomputed_vectors_never_imports_torch(tmp_path, tiny_clip, home):
    """The CLIP that made the vectors is recorded with its full identity (loaded in a child process), while
    the build itself stays free of torch and open_clip (~0.9 GB resident otherwise)."""
    import subprocess
    import sys

    from rdm.embed.embedder import Embedder

    vectors = normalise(np.random.default_rng(0).standard_normal((300, Embedder.load(tiny_clip).dim)).astype(np.float32))
    np.save(tmp_path / "vecs.npy", vectors)
    more = normalise(np.random.default_rng(1).standard_normal(vectors.shape).astype(np.float32))
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = pa.FixedSizeListArray.from_arrays(pa.array(more.reshape(-1)), more.shape[1])
    pq.write_table(pa.table({"id": [f"more-{i}" for i in range(len(more))], "embedding": emb}),
                   tmp_path / "more.parquet")  # appended: recorded with the database's CLIP, nothing loaded at all
    code = ("import sys; from rdm import api; api.build_index(sys.argv[1], name='vecs', clip=sys.argv[2], "
            "indexes=sys.argv[3], progress=False); print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "vecs.npy"), tiny_clip, str(home)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    db = Database.open("vecs", home)
    assert db.manifest["embedder"] == Embedder.load(tiny_clip).identity.to_dict()  # with the weights' checksum
    assert db.search(vectors[:3], k=1).rows[:, 0].tolist() == [0, 1, 2]
    append = ("import sys; from rdm import api; api.build_index(sys.argv[1], name='vecs', indexes=sys.argv[2], "
              "append=True, progress=False); print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", append, str(tmp_path / "more.parquet"), str(home)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    grown = Database.open("vecs", home)
    assert grown.count == 2 * len(vectors) and grown.manifest["embedder"] == db.manifest["embedder"]
    with pytest.raises(RDMError, match=r"makes \d+-d vectors, but these are 8-d"):
        np.save(tmp_path / "wrong.npy", vectors[:, :8].copy())
        api.build_index(str(tmp_path / "wrong.npy"), name="wrong", clip=tiny_clip, indexes=str(home), progress=False)


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "OPQ8,IVF32,PQ8"])  # a rotation in front: re-encoded through it
def test_an_approximate_database_compacts_and_still_finds_its_items(tmp_path, tiny_clip, home, factory):
    rng = np.random.default_rng(2)
    centres = normalise(rng.standard_normal((50, 32)).astype(np.float32))
    vectors = normalise(centres[rng.integers(0, 50, 5000)] + 0.05 * rng.standard_normal((5000, 32)).astype(np.float32))
    np.save(tmp_path / "vecs.npy", vectors)
    build(tmp_path / "vecs.npy", "ivfc", tiny_clip, home, index_factory=factory)
    db = Database.open("ivfc", home)
    db.remove(ids=[str(i) for i in range(0, 5000, 2)])
    db.compact()
    db = Database.open("ivfc", home)
    assert db.count == 2500 and not len(db.tombstones)
    found = db.search(vectors[1:400:2], k=10)  # re-encoded shares: each kept item is found by its own vector
    own = [str(i) in {h["id"] for h in hits} for i, hits in zip(range(1, 400, 2), found.records)]
    assert np.mean(own) >= 0.95
    assert not any(int(h["id"]) % 2 == 0 for hits in found.records for h in hits)  # removed rows are gone
