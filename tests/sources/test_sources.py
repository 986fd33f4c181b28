"""Sources: Hugging Face datasets (saved, parquet, imagefolder, streaming) and precomputed embeddings."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdm import api
from rdm.db.database import Database
from rdm.errors import RDMError, SourceError
from rdm.sources import EmbeddingsSource, FolderSource, HFDatasetSource, open_source
from tests.helpers.imagezoo import picture_png as _png
from tests.helpers.world import make_folder


@pytest.fixture
def art_dataset():
    """A WikiArt-like dataset: image, ClassLabel style, caption, licence."""
    features = datasets.Features({"image": datasets.Image(), "style": datasets.ClassLabel(names=["Cubism", "Baroque"]),
                                  "text": datasets.Value("string"), "licence": datasets.Value("string")})
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(8)], "style": [i % 2 for i in range(8)],
            "text": [f"painting {i}" for i in range(8)], "licence": ["cc0"] * 6 + ["restricted"] * 2}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds = ds.cast_column("image", datasets.Image())
    return ds


def test_saved_dataset_with_classlabels_and_caption(art_dataset, tmp_path, tiny_clip):
    art_dataset.save_to_disk(str(tmp_path / "saved"))
    src = open_source(str(tmp_path / "saved"))
    assert isinstance(src, HFDatasetSource) and src.image_column == "image" and src.caption_column == "text"
    items = list(src.iter_items())
    assert [it.meta["style"] for it in items[:2]] == ["Cubism", "Baroque"]  # ClassLabel ints -> names
    assert items[3].meta["caption"] == "painting 3" and items[3].meta["source_row"] == 3
    api.build_index(str(tmp_path / "saved"), name="art", clip=tiny_clip, indexes=str(tmp_path / "ix"), workers=0,
                    progress=False)
    db = Database.open("art", tmp_path / "ix")
    hits = db.search(db.vectors[:1], k=8, where=["style=Baroque", "licence=cc0"]).hits(0)
    assert {h["source_row"] for h in hits} == {1, 3, 5}


def test_parquet_and_streaming_give_the_same_items(art_dataset, tmp_path):
    art_dataset.to_parquet(str(tmp_path / "art.parquet"))
    plain = open_source(str(tmp_path / "art.parquet"))
    streamed = HFDatasetSource(str(tmp_path / "art.parquet"), streaming=True)
    a, b = list(plain.iter_items()), list(streamed.iter_items())
    assert [x.id for x in a] == [x.id for x in b] and [x.payload for x in a] == [x.payload for x in b]
    assert [x.id for x in streamed.iter_items(start=5)] == [x.id for x in a[5:]]  # resume skips rows


def test_imagefolder_dataset(tmp_path):
    root = tmp_path / "imgf"
    names = make_folder(root, 4)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "caption": f"c{n}"}) for n in names))
    src = HFDatasetSource(str(root))
    items = list(src.iter_items())
    assert len(items) == 4 and sorted(it.meta["caption"] for it in items) == sorted(f"c{n}" for n in names)
    folder = open_source(str(root))  # a plain folder stays a folder source, reading the same metadata
    assert isinstance(folder, FolderSource)
    assert [it.meta["caption"] for it in folder.iter_items()] == [f"c{n}" for n in names]


def test_missing_columns_and_datasets_are_clear(art_dataset, tmp_path):
    art_dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match="no image column pixels"):
        HFDatasetSource(str(tmp_path / "saved"), image_column="pixels")
    with pytest.raises(SourceError, match="no column 'caption'"):
        HFDatasetSource(str(tmp_path / "saved"), caption_column="caption")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nothing_here"))


def test_npy_parquet_and_compvis_npz_embeddings(tmp_path, tiny_clip):
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((12, 32)).astype(np.float32)
    np.save(tmp_path / "v.npy", vec)
    table = pa.table({"id": [f"item{i}" for i in range(12)], "embedding": [list(v) for v in vec],
                      "style": ["a", "b"] * 6})
    pq.write_table(table, tmp_path / "v.parquet")
    img_id = np.array([f"img{i // 3}" for i in range(12)])  # 3 patches per image
    np.savez(tmp_path / "compvis.npz", embedding=vec, img_id=img_id, patch_coords=rng.integers(0, 64, (12, 4)))
    ids = {}
    for name in ("v.npy", "v.parquet", "compvis.npz"):
        src = open_source(str(tmp_path / name))
        assert isinstance(src, EmbeddingsSource)
        ids[name] = [it.id for it in src.iter_items()]
        report = api.build_index(str(tmp_path / name), name=name.replace(".", "_"), clip=tiny_clip,
                                 indexes=str(tmp_path / "ix"), progress=False)
        db = Database.open(name.replace(".", "_"), tmp_path / "ix")
        assert report.total == 12
        expected = vec / np.linalg.norm(vec, axis=1, keepdims=True)
        assert np.allclose(db.vectors, expected, atol=1e-6)  # stored exactly (normalised), not re-embedded
        assert (db.search(db.vectors, k=1).rows[:, 0] == np.arange(12)).all()
    assert ids["v.parquet"][0] == "item0" and ids["compvis.npz"][:4] == ["img0#0", "img0#1", "img0#2", "img1#0"]
    with pytest.raises(RDMError, match="makes 32-d vectors, but these are 16-d"):
        np.save(tmp_path / "wrong.npy", vec[:, :16])
        api.build_index(str(tmp_path / "wrong.npy"), clip=tiny_clip, indexes=str(tmp_path / "ix"), progress=False)
