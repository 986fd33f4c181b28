"""Toy art: determinism, recognisable colours and placement, distinguishable styles, captions, files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from rdm.demo.toyart import (
    COLOURS,
    METADATA_FILE,
    SHAPES,
    STYLES,
    ToyArtSpec,
    generate,
    read_metadata,
    render,
    sample_item,
    sample_labels,
    shape_points,
)
from rdm.errors import RDMError

CHROMA_MIN = 0.2  # pixels at least this far from grey count as the shape's


def _pixels(image) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _chroma(px: np.ndarray) -> np.ndarray:
    """max - min per pixel; every background is grey, so this is zero off the shape."""
    return px.max(axis=-1) - px.min(axis=-1)


def _hue_degrees(px: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of RGB pixels (..., 3) in [0, 1]; grey pixels get 0."""
    r, g, b = np.moveaxis(px, -1, 0)
    top, chroma = px.max(axis=-1), _chroma(px)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(top == r, (g - b) / safe, np.where(top == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    return (60.0 * hue) % 360.0


def _circular_distance(a: float, b: float) -> float:
    """Angle between two hues in degrees."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


HUES = {name: float(_hue_degrees(np.array(rgb) / 255.0)) for name, rgb in COLOURS.items()}


def _shape_hue(image) -> float:
    """Chroma-weighted circular mean hue, in degrees, of the pixels that are not grey (the shape's)."""
    px = _pixels(image)
    chroma = _chroma(px)
    keep = chroma > CHROMA_MIN
    assert keep.sum() >= 10, "hardly any coloured pixels"
    angles, weights = np.radians(_hue_degrees(px[keep])), chroma[keep]
    return float(np.degrees(np.arctan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum())) % 360)


def _dominant_colour(image) -> str:
    """The COLOURS name whose hue is nearest the shape's mean hue."""
    hue = _shape_hue(image)
    return min(HUES, key=lambda name: _circular_distance(HUES[name], hue))


def _spans(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill each column (axis=0) or row (axis=1) of `mask` between its first and last set pixel."""
    idx = np.arange(mask.shape[axis]).reshape((-1, 1) if axis == 0 else (1, -1))
    first = np.where(mask, idx, mask.shape[axis]).min(axis=axis, keepdims=True)
    last = np.where(mask, idx, -1).max(axis=axis, keepdims=True)
    return (idx >= first) & (idx <= last)


def _style_features(image) -> np.ndarray:
    """Background level, fill of the silhouette, stroke thickness, crossings, diagonal bias, tile edges."""
    px = _pixels(image)
    lum = px.mean(axis=-1)
    side = lum.shape[0]
    border = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    mask = _chroma(px) > CHROMA_MIN
    silhouette = _spans(mask, 0) & _spans(mask, 1)
    fill = mask.sum() / silhouette.sum()
    core = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    thickness = core.sum() / mask.sum()
    m = mask.astype(int)
    crossings = (np.abs(np.diff(m, axis=1)).sum() / silhouette.any(axis=1).sum()
                 + np.abs(np.diff(m, axis=0)).sum() / silhouette.any(axis=0).sum())
    inner = silhouette[1:, :-1] & silhouette[:-1, 1:] & silhouette[1:, 1:] & silhouette[:-1, :-1]
    along = np.abs(lum[1:, :-1] - lum[:-1, 1:])[inner].mean()  # neighbour along x + y = const
    across = np.abs(lum[1:, 1:] - lum[:-1, :-1])[inner].mean()
    dx = np.abs(np.diff(lum, axis=1))
    on_tile_edge = (np.arange(side - 1) + 1) % (side // 16) == 0
    blockiness = (dx[:, on_tile_edge].mean() + 1e-4) / (dx[:, ~on_tile_edge].mean() + 1e-4)
    return np.array([np.median(border), fill, thickness, np.log(crossings),
                     np.log((across + 1e-3) / (along + 1e-3)), np.log(blockiness)])


def test_same_seed_and_index_give_identical_pixels_in_any_order():
    spec = ToyArtSpec(seed=3)
    forward = [sample_item(spec, i)[0].tobytes() for i in range(6)]
    backward = [sample_item(spec, i)[0].tobytes() for i in reversed(range(6))][::-1]
    assert forward == backward
    assert len(set(forward)) == 6, "different indices should give different images"
    assert sample_item(ToyArtSpec(seed=4), 0)[0].tobytes() != forward[0]


def test_restricting_styles_keeps_each_index_content():
    spec = ToyArtSpec(seed=1)
    for i in range(20):
        full = sample_labels(spec, i)
        neon = sample_labels(replace(spec, styles=("neon",)), i)
        assert neon["style"] == "neon"
        for key in ("shape", "colour", "x", "y", "scale", "rotation", "style_in_caption"):
            assert neon[key] == full[key]


@pytest.mark.parametrize("size", [64, 128])
def test_every_shape_colour_style_renders_with_its_colour_in_its_place(size):
    rng = np.random.default_rng(size)
    for style in STYLES:
        for shape in SHAPES:
            for colour in COLOURS:
                scale = rng.uniform(0.19, 0.33)
                x, y = rng.uniform(scale + 0.05, 0.95 - scale, size=2)
                rotation = rng.uniform(-20, 20)
                image = render(shape, colour, style, size, x=x, y=y, scale=scale, rotation=rotation, rng=rng)
                assert image.size == (size, size) and image.mode == "RGB"
                assert _dominant_colour(image) == colour, (shape, colour, style)
                assert _circular_distance(_shape_hue(image), HUES[colour]) < 3.0, (shape, colour, style)
                rows, cols = np.nonzero(_chroma(_pixels(image)) > CHROMA_MIN)
                seen = np.array([cols.min() + cols.max() + 1, rows.min() + rows.max() + 1]) / (2 * size)
                polygon = np.array(shape_points(shape, x, y, scale, rotation))
                drawn = (polygon.min(axis=0) + polygon.max(axis=0)) / 2
                assert np.abs(seen - drawn).max() < 0.05, (shape, colour, style, seen, drawn)


def test_large_images_render():
    for style in STYLES:
        image, labels = sample_item(ToyArtSpec(size=256, styles=(style,)), 0)
        assert image.size == (256, 256)
        assert _dominant_colour(image) == labels["colour"]


@pytest.mark.parametrize("size", [64, 128])
def test_styles_are_told_apart_by_a_nearest_centroid_classifier(size):
    spec = ToyArtSpec(seed=7, size=size)
    items = [sample_item(spec, i) for i in range(400)]
    features = np.stack([_style_features(image) for image, _ in items])
    styles = np.array([labels["style"] for _, labels in items])
    train, test = slice(0, 200), slice(200, 400)
    mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-8
    z = (features - mean) / std
    centroids = np.stack([z[train][styles[train] == s].mean(axis=0) for s in STYLES])
    predicted = np.array(STYLES)[np.argmin(((z[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (predicted == styles[test]).mean()
    assert accuracy >= 0.95, f"style accuracy {accuracy:.3f}"


def test_captions_name_content_always_and_style_about_as_often_as_asked():
    spec = ToyArtSpec(seed=2, style_caption_prob=0.5)
    labels = [sample_labels(spec, i) for i in range(400)]
    for row in labels:
        assert row["shape"] in row["caption"] and row["colour"] in row["caption"]
        assert (row["style"] in row["caption"]) == row["style_in_caption"]
        assert sum(style in row["caption"] for style in STYLES) == int(row["style_in_caption"])
    assert abs(np.mean([row["style_in_caption"] for row in labels]) - 0.5) < 0.1
    assert not any(sample_labels(replace(spec, style_caption_prob=0.0), i)["style_in_caption"] for i in range(50))
    assert all(sample_labels(replace(spec, style_caption_prob=1.0), i)["style_in_caption"] for i in range(50))
    assert any(row["caption"].startswith("an orange") for row in labels)
    assert not any(" a orange" in row["caption"] or row["caption"].startswith("a orange") for row in labels)


def test_generate_writes_imagefolder_layout(tmp_path):
    spec = ToyArtSpec(seed=5)
    out = generate(spec, 12, tmp_path / "all", start=3)
    rows = read_metadata(out)
    assert [row["index"] for row in rows] == list(range(3, 15))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [METADATA_FILE]
    for row in rows:
        assert row["file_name"] == f"{row['style']}/{row['index']:06d}.png"
        assert (out / row["file_name"]).is_file()
        image, labels = sample_item(spec, row["index"])
        assert {k: v for k, v in row.items() if k != "file_name"} == labels
        assert Image.open(out / row["file_name"]).tobytes() == image.tobytes()
    pngs = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert pngs == sorted(row["file_name"] for row in rows)
    first = json.loads((out / METADATA_FILE).read_text().splitlines()[0])
    assert {"file_name", "caption", "shape", "colour", "style"} <= set(first)


def test_generate_one_style_makes_a_paired_database(tmp_path):
    spec = ToyArtSpec(seed=5)
    neon = read_metadata(generate(spec, 8, tmp_path / "neon", styles=["neon"]))
    flat = read_metadata(generate(spec, 8, tmp_path / "flat", styles=["flat"]))
    assert {row["style"] for row in neon} == {"neon"} and {row["style"] for row in flat} == {"flat"}
    assert [(r["shape"], r["colour"]) for r in neon] == [(r["shape"], r["colour"]) for r in flat]
    assert not (tmp_path / "neon" / "flat").exists()


def test_generate_refuses_a_non_empty_folder_unless_told(tmp_path):
    generate(ToyArtSpec(), 2, tmp_path)
    with pytest.raises(RDMError, match="not empty"):
        generate(ToyArtSpec(), 2, tmp_path)
    generate(ToyArtSpec(), 3, tmp_path, overwrite=True)
    assert len(read_metadata(tmp_path)) == 3


def test_bad_names_are_errors_that_list_the_choices():
    with pytest.raises(RDMError, match="choose from flat"):
        ToyArtSpec(styles=("flat", "watercolour"))
    with pytest.raises(RDMError, match="Unknown toy-art shape"):
        render("blob", "red", "flat")
    with pytest.raises(RDMError, match="probability"):
        ToyArtSpec(style_caption_prob=1.5)



def test_hf_imagefolder_reads_images_and_captions(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = generate(ToyArtSpec(seed=9), 12, tmp_path / "set")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    rows = {row["index"]: row for row in read_metadata(out)}
    assert len(loaded) == 12
    for item in loaded:
        assert item["caption"] == rows[item["index"]]["caption"]
        assert item["image"].size == (64, 64)
