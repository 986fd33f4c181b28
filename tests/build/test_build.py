"""Building: the mixed folder, SIGKILL + --resume, concurrency, skips, workers."""

import json
import os
import signal

import numpy as np
import pytest

from rdm import api
from rdm.build import BUILD_DIR, BuildOptions, build_database
from rdm.db.database import Database
from rdm.embed.embedder import Embedder
from rdm.sources import FolderSource
from tests.helpers.world import cli_env, make_folder
from tests.helpers.world import rdm_process as rdm


def snapshot(home, name):
    db = Database.open(name, home)
    return db.ids, db.vectors.copy(), db.metadata.drop_columns(["path"]).to_pylist(), db.skipped_list()


def test_mixed_folder_embeds_every_good_image_and_lists_every_bad_one(zoo, tiny_clip, tmp_path):
    root, good, bad = zoo
    home = tmp_path / "indexes"
    out = rdm("build-index", root, "--name", "zoo", "--clip", tiny_clip, "--batch-size", 4, "--workers", 1,
              "--indexes", home)
    assert "embedded   18 items" in out.stdout and f"skipped    {len(bad)}" in out.stdout
    info = json.loads(rdm("--indexes", home, "info", "zoo", "--json").stdout)
    assert info["count"] == len(good) and info["dim"] == 32 and info["embedder"]["model"] == tiny_clip
    assert {s["id"]: s["reason"] for s in info["skipped"]} == bad
    assert all(set(s) >= {"path", "reason"} for s in info["skipped"])
    db = Database.open("zoo", home)
    assert sorted(db.ids) == sorted(good)
    # each embedded image, searched by itself (re-decoded and re-embedded), is its own nearest neighbour
    queries = [root / rel for rel in sorted(good)]
    hits = json.loads(rdm("--indexes", home, "search", "--db", "zoo", "-k", 6, "--json",
                          *sum([["--image", q] for q in queries], [])).stdout)
    for rel, qh in zip(sorted(good), hits):
        scores = {h["id"]: h["score"] for h in qh}
        assert rel in scores and scores[rel] >= qh[0]["score"] - 1e-6, (rel, qh[:2])
        assert qh[0]["score"] > 0.999
    # an image and its EXIF-rotated, transparent-over-white and 16-bit twins get the same embedding
    twin = lambda n: db.vectors[db.ids.index(f"twins/{n}")]  # noqa: E731
    for name in ("exif_rotated.png", "transparent.png", "sixteen_bit.png"):
        assert np.allclose(twin(name), twin("original.png"), atol=1e-6), name


def test_links_out_of_the_source_folder_are_skipped_not_embedded(tmp_path, tiny_clip):
    """A symlink inside the folder that points outside it is listed as skipped (outside-source), never read; a link
    to a file inside the folder is an ordinary item."""
    from rdm import api

    root, outside = tmp_path / "pics", tmp_path / "private"
    make_folder(root, 3)
    make_folder(outside, 1, seed=900)
    (root / "leak.png").symlink_to(outside / "img000.png")
    (root / "again.png").symlink_to(root / "img001.png")
    report = api.build_index(str(root), name="pics", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=0,
                             progress=False)
    assert report.embedded == 4 and report.skipped == {"outside-source": 1}
    info = api.info("pics", str(tmp_path / "ix"))
    assert [(s["id"], s["reason"]) for s in info["skipped"]] == [("leak.png", "outside-source")]
    assert "leak.png" not in Database.open("pics", tmp_path / "ix").ids


def test_all_bad_batch_does_not_crash(tmp_path, tiny_clip):
    root = tmp_path / "mostly_bad"
    make_folder(root, 3)
    for i in range(4):
        (root / f"a_bad{i}.png").write_bytes(b"")  # sorts first: the first two batches are all bad
    report = api.build_index(str(root), name="mb", clip=tiny_clip, indexes=str(tmp_path / "ix"), batch_size=2,
                             workers=1, progress=False)
    assert report.total == 3 and report.skipped == {"empty": 4}


def test_nothing_embeddable_and_missing_source_fail_clearly(tmp_path, tiny_clip):
    home = tmp_path / "ix"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("<html>")
    out = rdm("build-index", tmp_path / "junk", "--clip", tiny_clip, "--indexes", home, check=False)
    assert out.returncode == 1 and "nothing could be embedded" in out.stderr and "Traceback" not in out.stderr
    out = rdm("build-index", tmp_path / "nowhere", "--clip", tiny_clip, "--indexes", home, check=False)
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty_dir").mkdir()
    out = rdm("build-index", tmp_path / "empty_dir", "--clip", tiny_clip, "--indexes", home, check=False)
    assert out.returncode == 1 and "holds no images" in out.stderr


@pytest.mark.parametrize("point", ["after-shard:0", "after-shard:2", "before-commit"])
def test_sigkill_then_resume_gives_the_same_database(tmp_path, tiny_clip, point):
    root = tmp_path / "pics"
    make_folder(root, 30)
    (root / "broken.png").write_bytes(b"GIF89a broken")
    args = ["build-index", root, "--name", "pics", "--clip", tiny_clip, "--batch-size", 2, "--workers", 0,
            "--checkpoint-every", 2]
    ref_home, home = tmp_path / "ref", tmp_path / "killed"
    rdm(*args, "--indexes", ref_home)

    killed = rdm(*args, "--indexes", home, env=cli_env(RDM_FAULT=point), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (home / "pics" / "manifest.json").exists()  # nothing half-published
    out = rdm("--indexes", home, "search", "--db", "pics", "x", check=False)
    assert out.returncode == 1 and "--resume" in out.stderr

    count_shards = len(json.loads((home / "pics" / BUILD_DIR / "progress.json").read_text())["segments"])
    resumed = rdm(*args, "--indexes", home, "--resume")
    if point != "before-commit":
        assert f"resumed after {count_shards * 2 * 2} source items" in resumed.stdout
    ids, vecs, meta, skipped = snapshot(home, "pics")
    ref_ids, ref_vecs, ref_meta, ref_skipped = snapshot(ref_home, "pics")
    assert ids == ref_ids and len(set(ids)) == 30
    assert np.array_equal(vecs, ref_vecs)
    assert meta == ref_meta and skipped == ref_skipped
    assert not (home / "pics" / BUILD_DIR).exists()


def test_resume_does_not_re_embed_finished_shards(tmp_path, tiny_clip, monkeypatch):
    root = tmp_path / "pics"
    make_folder(root, 12)
    emb = Embedder.load(tiny_clip)
    opts = dict(batch_size=2, batches_per_shard=1, workers=0, progress=False)
    monkeypatch.setenv("RDM_FAULT", "never")
    # a killed build: simulate by running to shard 3, then killing the iteration with an exception
    calls = []
    original = emb.encode_pixels

    def counting(px):
        calls.append(len(px))
        if len(calls) == 4:
            raise KeyboardInterrupt  # interrupt mid-build
        return original(px)

    monkeypatch.setattr(emb, "encode_pixels", counting)
    with pytest.raises(KeyboardInterrupt):
        build_database(FolderSource(root), "p", emb, tmp_path / "ix", BuildOptions(**opts))
    calls.clear()
    monkeypatch.setattr(emb, "encode_pixels", lambda px: (calls.append(len(px)), original(px))[1])
    report = build_database(FolderSource(root), "p", emb, tmp_path / "ix", BuildOptions(resume=True, **opts))
    assert sum(calls) == 12 - 6 and report.resumed_from == 6 and report.total == 12


def test_resume_with_other_settings_is_refused(tmp_path, tiny_clip):
    root = tmp_path / "pics"
    make_folder(root, 8)
    home = tmp_path / "ix"
    out = rdm("build-index", root, "--clip", tiny_clip, "--batch-size", 2, "--workers", 0, "--indexes", home,
              "--checkpoint-every", 1, env=cli_env(RDM_FAULT="after-shard:0"), check=False)
    assert out.returncode == -signal.SIGKILL
    out = rdm("build-index", root, "--clip", tiny_clip, "--batch-size", 4, "--workers", 0, "--indexes", home,
              "--checkpoint-every", 1, "--resume", check=False)
    assert out.returncode == 1 and "other settings (batch_size)" in out.stderr


def test_concurrent_build_of_the_same_name_is_refused(tmp_path, tiny_clip):
    """While one process writes database `pics`, `rdm build-index` of the same name stops at once."""
    from rdm.db import store
    root = tmp_path / "pics"
    make_folder(root, 4)
    home = tmp_path / "ix"
    with store.writer_lock(home / "pics", "pics"):  # this test process is the first writer
        # refused, not waiting: it ends while this process still holds the lock (waiting would hit the timeout)
        second = rdm("build-index", root, "--clip", tiny_clip, "--indexes", home, check=False, timeout=120)
        assert second.returncode == 1
        assert f"database pics is being written by pid {os.getpid()}" in second.stderr
        assert "Traceback" not in second.stderr
    assert not (home / "pics" / "manifest.json").exists()
    rdm("build-index", root, "--clip", tiny_clip, "--indexes", home)  # once free, it builds


def test_limit_and_spawned_workers_give_the_inline_result(tmp_path, tiny_clip):
    root = tmp_path / "pics"
    make_folder(root, 10)
    a = api.build_index(str(root), name="a", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=0, limit=7,
                        batch_size=3, progress=False)
    b = api.build_index(str(root), name="b", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=2, limit=7,
                        batch_size=3, progress=False)
    assert a.total == b.total == 7
    da, dbb = Database.open("a", tmp_path / "ix"), Database.open("b", tmp_path / "ix")
    assert da.ids == dbb.ids and np.allclose(da.vectors, dbb.vectors, atol=1e-6)


def test_source_order_is_sorted_and_ids_relative(tmp_path):
    root = tmp_path / "f"
    (root / "b").mkdir(parents=True)
    make_folder(root / "b", 2)
    make_folder(root, 2)
    (root / "C.PNG").write_bytes((root / "img000.png").read_bytes())
    os.symlink(root / "nope.png", root / "a_dangling.jpg")
    src = FolderSource(root)
    assert src.files == sorted(src.files) and "C.PNG" in src.files and "b/img001.png" in src.files
    assert "a_dangling.jpg" in src.files  # listed, then skipped as missing when decoded
