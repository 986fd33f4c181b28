"""Sources big collections come in: webdataset tar shards (brace patterns, folders, corrupt members)
and img2dataset's parquet output / parquets of image paths, read and built by the local engine."""

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rdm import api
from rdm.db.database import Database
from rdm.errors import SourceError
from rdm.sources import open_source
from rdm.sources.webdataset import ParquetImageSource, WebDatasetSource, expand_braces
from tests.helpers.imagezoo import base_picture, write_shards
from tests.helpers.world import make_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return root, write_shards(root)


def test_brace_patterns_globs_and_folders_name_the_same_shards(shards):
    root, keys = shards
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    specs = [f"{root}/{{00000..00002}}.tar", f"{root}/*.tar", str(root)]
    sources = [open_source(s) for s in specs]
    assert all(isinstance(s, WebDatasetSource) for s in sources)
    ids = [[it.id for it in s.iter_items()] for s in sources]
    assert ids[0] == ids[1] == ids[2] == keys[:-1]  # the cut-off shard lost its last sample's header
    with pytest.raises(SourceError, match="1 of the 4 shards"):
        open_source(f"{root}/{{00000..00003}}.tar")


def test_samples_carry_json_columns_and_txt_captions_and_resume_anywhere(shards):
    root, _ = shards
    src = open_source(str(root))
    items = list(src.iter_items())
    first = items[0]
    assert first.id == "000000000" and first.meta["caption"] == "picture 000000000"
    assert first.meta["url"] == "https://example.org/000000000.jpg" and first.meta["original_width"] == 48
    assert first.meta["shard"].endswith("00000.tar") and isinstance(first.payload, bytes)
    for start in (0, 4, 5, 7, 13):  # from any index, in any shard: the same items
        assert [(it.index, it.id) for it in src.iter_items(start)] == [(it.index, it.id) for it in items[start:]]
    assert items[-1].payload.reason == "truncated" and "cut off" in items[-1].payload.detail


def test_corrupt_members_are_reported_skips_and_the_rest_is_built(shards, tiny_clip, tmp_path):
    root, keys = shards
    report = api.build_index(str(root), name="wds", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=0,
                             batch_size=4, progress=False)
    db = Database.open("wds", tmp_path / "ix")
    bad = {s["id"]: s["reason"] for s in db.skipped_list()}
    assert set(bad) == {"000010002", "000020003"} and bad["000020003"] == "truncated"
    assert bad["000010002"] in ("truncated", "not-an-image")  # garbage after a JPEG marker
    assert db.ids == [k for k in keys[:-1] if k not in bad] and report.total == 12
    assert db.metadata.column("caption").to_pylist()[0] == "picture 000000000"


def test_a_corrupt_header_is_skipped_and_the_shard_read_on(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    # a whole shard whose second sample's first header is damaged
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(4):
            for ext, payload in (("jpg", _jpeg(i)), ("txt", b"t")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = bytearray((root / "00000.tar").read_bytes())
    second = data.index(b"k1.jpg")
    data[second:second + 6] = b"XXXXXX"  # the header checksum no longer matches
    (root / "00000.tar").write_bytes(bytes(data))
    src = WebDatasetSource(str(root / "00000.tar"))
    items = list(src.iter_items())
    ids = [it.id for it in items]
    assert ids[0] == "k0" and ids[2:] == ["k1", "k2", "k3"] and len(src) == 5
    assert ids[1].startswith("00000.tar@") and items[1].payload.reason == "truncated"  # the lost header
    assert items[2].payload.reason == "missing" and "no image member" in items[2].payload.detail  # k1.txt alone
    assert all(isinstance(it.payload, bytes) for it in items[3:])


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(base_picture(seed)).save(buf, "JPEG")
    return buf.getvalue()


def test_img2dataset_parquet_output_with_failed_downloads(tmp_path, tiny_clip):
    n = 6
    table = pa.table({"key": [f"{i:09d}" for i in range(n)],
                      "jpg": [None if i == 2 else _jpeg(i) for i in range(n)],
                      "txt": [None if i == 2 else f"caption {i}" for i in range(n)],
                      "url": [f"https://example.org/{i}.jpg" for i in range(n)],
                      "caption": [f"caption {i}" for i in range(n)],
                      "status": ["failed_to_download" if i == 2 else "success" for i in range(n)],
                      "error_message": ["HTTP 404" if i == 2 else None for i in range(n)],
                      "width": [48] * n, "height": [40] * n})
    (tmp_path / "out").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "out" / "00000.parquet", row_group_size=3)
    pq.write_table(table.slice(4), tmp_path / "out" / "00001.parquet")
    src = open_source(str(tmp_path / "out"))
    assert isinstance(src, ParquetImageSource) and len(src) == n
    assert [it.id for it in src.iter_items(2)] == [f"{i:09d}" for i in range(2, n)]
    api.build_index(str(tmp_path / "out"), name="i2d", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=0,
                    progress=False)
    db = Database.open("i2d", tmp_path / "ix")
    assert db.ids == [f"{i:09d}" for i in range(n) if i != 2]
    assert db.skipped_list()[0]["reason"] == "missing" and "HTTP 404" in db.skipped_list()[0]["detail"]
    assert db.metadata.column("caption").to_pylist()[:2] == ["caption 0", "caption 1"]
    assert db.metadata.column("url").to_pylist()[0] == "https://example.org/0.jpg"


def test_parquet_of_local_image_paths_with_metadata(tmp_path, tiny_clip):
    names = make_folder(tmp_path / "imgs", 4)
    pq.write_table(pa.table({"image_path": [f"imgs/{n}" for n in names] + ["imgs/gone.png"],
                             "style": ["a", "b", "a", "b", "a"], "text": [f"t{i}" for i in range(5)]}),
                   tmp_path / "list.parquet")
    src = open_source(str(tmp_path / "list.parquet"))
    assert isinstance(src, ParquetImageSource) and src.path_column == "image_path"
    api.build_index(str(tmp_path / "list.parquet"), name="paths", clip=tiny_clip, indexes=str(tmp_path / "ix"),
                    workers=0, progress=False)
    db = Database.open("paths", tmp_path / "ix")
    assert db.ids == [f"imgs/{n}" for n in names] and db.skipped_list()[0]["reason"] == "missing"
    assert db.metadata.column("style").to_pylist() == ["a", "b", "a", "b"]
    assert db.metadata.column("caption").to_pylist() == ["t0", "t1", "t2", "t3"]
