"""The Ray engine on a real local Ray cluster: the same database as the local engine (a folder with bad
files, webdataset shards with corrupt members, a Hugging Face dataset), and SIGKILL of the driver +
--resume equal to an uninterrupted build, with the finished segments reused, not re-embedded."""

import json
import signal

import numpy as np
import pytest

from rdm import api
from rdm.build import BUILD_DIR
from rdm.build.ray_data import shard_items_for, shard_plan
from rdm.db.database import Database
from tests.helpers.imagezoo import picture_png as _png
from tests.helpers.imagezoo import write_shards
from tests.helpers.world import cli_env, make_folder
from tests.helpers.world import rdm_process as rdm


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-CPU Ray cluster owned by this test process; its address, for CLI drivers to join."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def build(source, home, name, engine, clip, **kw):
    opts = {"batch_size": 4, "checkpoint_every": 2, "workers": 1, "progress": False} | kw
    return api.build_index(str(source), name=name, clip=clip, indexes=str(home), engine=engine, **opts)


def snapshot(home, name):
    db = Database.open(name, home)
    return db.ids, np.asarray(db.vectors, np.float32), db.metadata.to_pylist(), db.skipped_list(), len(db.segments)


def assert_same(a, b):
    ids, vecs, meta, skipped, segments = a
    assert ids == b[0] and len(set(ids)) == len(ids)
    assert np.abs(vecs - b[1]).max(initial=0) <= 1e-6
    assert meta == b[2] and skipped == b[3]
    assert segments >= b[4]  # a small Ray build cuts finer shards (shard_items_for), within the local segments


def test_small_builds_cut_finer_shards_within_the_local_segments():
    assert shard_items_for(100_000, 64, 16, actors=1) == 64 * 16  # large: the local engine's segments
    assert shard_items_for(1024, 64, 16, actors=1) == 64 * 4  # one 1024-item segment: 4 shards to overlap
    assert shard_items_for(1024, 64, 12, actors=1) == 64 * 4  # a divisor of 12, so boundaries stay shared
    assert shard_items_for(10, 4, 16, actors=2) == 4  # never under one batch


def test_shards_follow_source_positions():
    assert shard_plan(10, 0, 4, set()) == [{"k": 0, "lo": 0, "hi": 4}, {"k": 1, "lo": 4, "hi": 8},
                                           {"k": 2, "lo": 8, "hi": 10}]
    assert [s["k"] for s in shard_plan(10, 4, 4, {2})] == [1]


def test_engine_options_are_checked_before_anything_runs(tmp_path, tiny_clip):
    out = rdm("build-index", tmp_path, "--ray-address", "auto", "--clip", tiny_clip, "--indexes", tmp_path / "ix",
              check=False)
    assert out.returncode == 1 and "--ray-address needs --engine ray" in out.stderr and "Traceback" not in out.stderr


def test_folder_with_bad_files_gives_the_local_database(ray_cluster, zoo, tiny_clip, tmp_path):
    root, good, bad = zoo
    build(root, tmp_path, "local", "local", tiny_clip)
    report = build(root, tmp_path, "ray", "ray", tiny_clip)
    assert report.total == len(good) and dict(report.skipped) == {r: list(bad.values()).count(r) for r in bad.values()}
    assert_same(snapshot(tmp_path, "ray"), snapshot(tmp_path, "local"))


def test_webdataset_with_corrupt_members_gives_the_local_database(ray_cluster, tiny_clip, tmp_path):
    write_shards(tmp_path / "shards")
    spec = f"{tmp_path}/shards/{{00000..00002}}.tar"
    build(spec, tmp_path, "local", "local", tiny_clip)
    build(spec, tmp_path, "ray", "ray", tiny_clip)
    ray_db = snapshot(tmp_path, "ray")
    assert {s["id"] for s in ray_db[3]} == {"000010002", "000020003"}
    assert_same(ray_db, snapshot(tmp_path, "local"))


def test_hf_dataset_gives_the_local_database(ray_cluster, tiny_clip, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "style": datasets.ClassLabel(names=["flat", "neon"])})
    rows = {"image": [{"bytes": _png(i) if i != 5 else b"not a png", "path": None} for i in range(10)],
            "text": [f"painting {i}" for i in range(10)], "style": [i % 2 for i in range(10)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    build(tmp_path / "saved", tmp_path, "local", "local", tiny_clip)
    build(tmp_path / "saved", tmp_path, "ray", "ray", tiny_clip)
    ray_db = snapshot(tmp_path, "ray")
    assert ray_db[3][0]["id"] == "train/5" and ray_db[2][1]["style"] == "neon"
    assert_same(ray_db, snapshot(tmp_path, "local"))


def test_sigkill_of_the_driver_then_resume_reuses_finished_segments(ray_cluster, tiny_clip, tmp_path):
    root = tmp_path / "pics"
    make_folder(root, 22)
    (root / "broken.png").write_bytes(b"GIF89a broken")
    args = ["build-index", root, "--name", "pics", "--clip", tiny_clip, "--batch-size", 2, "--workers", 1,
            "--checkpoint-every", 2]
    ray_args = ["--engine", "ray", "--ray-address", ray_cluster]
    rdm(*args, "--indexes", tmp_path / "ref")  # uninterrupted, local engine

    killed = rdm(*args, *ray_args, "--indexes", tmp_path / "ix", env=cli_env(RDM_FAULT="after-shard:1"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "ix" / "pics" / "manifest.json").exists()
    progress = json.loads((tmp_path / "ix" / "pics" / BUILD_DIR / "progress.json").read_text())
    finished = {s["id"] for s in progress["segments"]} | {s["id"] for s in progress.get("pending", {}).values()}
    assert len(progress["segments"]) == 2 and progress["next_index"] == 8

    resumed = rdm(*args, *ray_args, "--indexes", tmp_path / "ix", "--resume")
    assert "resumed after 8 source items" in resumed.stdout
    db = Database.open("pics", tmp_path / "ix")
    reused = finished & {s["id"] for s in db.manifest["segments"]}
    assert reused == finished  # every segment finished before the kill is in the database, as written then
    print(f"reused {len(reused)} of {len(db.segments)} segments: {sorted(reused)}")
    assert_same(snapshot(tmp_path / "ix", "pics"), snapshot(tmp_path / "ref", "pics"))
    assert not (tmp_path / "ix" / "pics" / BUILD_DIR).exists()
