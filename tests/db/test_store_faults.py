"""Writes killed with SIGKILL at every commit point leave the database as it was or as asked, nothing lost.

Each write runs in its own process with $RDM_FAULT naming the point where it is killed; afterwards
the database must open, verify (every file's digest), and hold exactly the old or the new items;
rerunning the write then gives what an uninterrupted one gives.
"""

import signal
import subprocess
import sys

import numpy as np
import pytest

from rdm import api
from rdm.db.database import Database
from tests.helpers.world import cli_env, make_folder

WRITE = r"""
import sys
import rdm.db.database
from rdm import api
rdm.db.manifest.SEGMENT_ROWS = 4  # several output segments from a small database
op, home = sys.argv[1], sys.argv[2]
db = rdm.db.database.Database.open("pics", home)
if op == "remove":
    db.remove(ids=sys.argv[3:])
elif op == "compact":
    print(db.compact()["resumed_segments"])
"""


def write(op, home, *args, fault=None):
    env = cli_env(RDM_FAULT=fault) if fault else cli_env()
    return subprocess.run([sys.executable, "-c", WRITE, op, str(home), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def state(home):
    db = Database.open("pics", home)
    assert db.verify()["ok"]
    return db.ids, db.vectors.copy(), db.metadata.drop_columns(["path"]).to_pylist()


@pytest.fixture
def built(tmp_path, tiny_clip):
    root = tmp_path / "pics"
    names = make_folder(root, 10)
    home = tmp_path / "indexes"
    api.build_index(str(root), name="pics", clip=tiny_clip, indexes=str(home), workers=0, batch_size=2,
                    checkpoint_every=2, progress=False)
    return home, names


@pytest.mark.parametrize("point", ["remove:before-commit", "remove:after-commit"])
def test_killed_remove_leaves_old_or_new(built, point):
    home, names = built
    before = state(home)
    killed = write("remove", home, names[1], names[4], fault=point)
    assert killed.returncode == -signal.SIGKILL
    ids, vectors, _ = state(home)
    if point == "remove:before-commit":
        assert ids == before[0] and np.array_equal(vectors, before[1])  # as it was
        assert write("remove", home, names[1], names[4]).returncode == 0  # the retry does it
    gone = set(Database.open("pics", home).ids)
    assert gone == set(names) - {names[1], names[4]}  # as asked
    db = Database.open("pics", home)
    found = db.search(before[1][[1, 4]], k=3)
    assert not {names[1], names[4]} & {h["id"] for q in range(2) for h in found.hits(q)}


@pytest.mark.parametrize("point", ["compact:after-segment:0", "compact:after-segment:1", "compact:before-commit",
                                   "compact:after-commit"])
def test_killed_compaction_resumes_to_the_same_database(built, point, tmp_path):
    home, names = built
    assert write("remove", home, names[0], names[5]).returncode == 0
    before = state(home)
    killed = write("compact", home, fault=point)
    assert killed.returncode == -signal.SIGKILL
    ids, vectors, meta = state(home)  # readers see the old database (or the compacted one), whole
    assert ids == before[0] and np.array_equal(vectors, before[1]) and meta == before[2]
    resumed = write("compact", home)
    assert resumed.returncode == 0, resumed.stderr
    if point.startswith("compact:after-segment:"):
        assert int(resumed.stdout.strip()) == int(point.rsplit(":", 1)[1]) + 1  # finished segments reused
    db = Database.open("pics", home)
    assert db.manifest["tombstones"] is None and db.live_rows().tolist() == list(range(8))
    assert len(db.segments) == 2  # 8 live rows in segments of 4
    ids, vectors, meta = state(home)
    assert ids == before[0] and np.array_equal(vectors, before[1]) and meta == before[2]
    assert not (home / "pics" / ".compact").exists()
    on_disk = {p.relative_to(home / "pics").as_posix() for p in (home / "pics").rglob("*")
               if p.is_file() and p.suffix in (".npy", ".parquet", ".faiss")}
    from rdm.db.store import referenced_files

    assert on_disk == referenced_files(db.manifest)  # the old segments are gone, nothing else is


@pytest.mark.parametrize("point", ["after-shard:0", "before-commit", "after-commit"])
def test_killed_append_resumes_to_the_same_database(built, point, tmp_path, tiny_clip):
    home, names = built
    more = tmp_path / "more"
    make_folder(more, 14)  # the same 10 pictures (same names, same pixels) and 4 new ones
    args = [sys.executable, "-m", "rdm.cli", "--indexes", str(home), "build-index", str(more), "--name", "pics",
            "--clip", tiny_clip, "--append", "--workers", "0", "--batch-size", "2", "--checkpoint-every", "1"]
    before = state(home)
    killed = subprocess.run(args, capture_output=True, text=True, env=cli_env(RDM_FAULT=point), timeout=300)
    assert killed.returncode == -signal.SIGKILL
    ids, vectors, _ = state(home)
    if point != "after-commit":
        assert ids == before[0] and np.array_equal(vectors, before[1])  # as it was
        done = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=cli_env(), timeout=300)
        assert done.returncode == 0, done.stderr
    db = Database.open("pics", home)
    assert sorted(db.ids) == sorted(set(names) | {f"img{i:03d}.png" for i in range(10, 14)}) and db.count == 14
    assert db.verify()["ok"]


def test_resume_starts_a_build_and_says_when_it_is_complete(tmp_path, tiny_clip):
    """`until rdm build-index SRC --name N --resume; do sleep 5; done` works from any state."""
    root = tmp_path / "pics"
    make_folder(root, 6)
    home = tmp_path / "ix"
    args = [sys.executable, "-m", "rdm.cli", "--indexes", str(home), "build-index", str(root), "--name", "p",
            "--clip", tiny_clip, "--workers", "0", "--resume"]
    first = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert first.returncode == 0 and "total      6 items" in first.stdout  # nothing to resume: it builds
    again = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert again.returncode == 0 and "is complete; nothing to resume" in again.stdout
    assert Database.open("p", home).count == 6
