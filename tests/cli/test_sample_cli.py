"""`rdm convert`, `rdm sample` and `rdm compare` end to end on CPU, with tiny databases and the golden model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdm.images.sheets import LABEL_H, PAD
from tests.helpers.world import GOLDEN, make_folder, need
from tests.helpers.world import run_cli as rdm

FAST = ["--seed", "1", "--steps", "5", "--quiet"]
FASTER = ["--seed", "1", "--steps", "2", "--height", "64", "--width", "64", "--quiet"]  # checks of conditioning only


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip):
    """Databases A and B (different pictures), made with the CLI, and a tiny model for their CLIP."""
    root = tmp_path_factory.mktemp("cli")
    make_folder(root / "picsA", 12, seed=100)
    make_folder(root / "picsB", 12, seed=500)
    home = root / "indexes"
    for name in ("A", "B"):
        rdm("--indexes", home, "build-index", root / f"pics{name}", "--name", name, "--clip", tiny_clip,
            "--workers", "0")
    from rdm.embed import load_embedder
    from rdm.models.tiny import make_tiny_rdm

    # a tiny model of the golden CompVis one's layout: 128 px, an autoencoder downsampling 16x, k 4
    model = make_tiny_rdm(root / "model", load_embedder(tiny_clip).identity.to_dict(), resolution=128, k=4,
                          vae_factor=16)
    return {"root": root, "home": home, "model": model, "clip": tiny_clip}


def sample(setup, out: Path, *args: str, ok: bool = True):
    return rdm("--indexes", setup["home"], "sample", "a red circle", "--model", setup["model"], "--out", out, *args,
               ok=ok)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.mark.parity
def test_convert_records_the_full_embedder_identity(setup, tmp_path):
    result = rdm("convert", need(GOLDEN / "model.ckpt"), "--config", GOLDEN / "config.yaml", "--clip", setup["clip"],
                 "--out", tmp_path / "model")
    assert "model folder:" in result.output
    config = json.loads((tmp_path / "model" / "rdm_config.json").read_text())
    assert config["embedder"]["model"] == setup["clip"] and len(config["embedder"]["weights_sha256"]) == 64
    assert config["embedder"]["dim"] == config["embedding_dim"] == 32


def test_sample_writes_images_provenance_and_grid_deterministically(setup, tmp_path):
    sample(setup, tmp_path / "one", "--db", "A", "-n", "2", *FAST)
    sample(setup, tmp_path / "two", "--db", "A", "-n", "2", *FAST)
    pngs = sorted((tmp_path / "one").glob("a-red-circle-[0-9].png"))
    assert [p.name for p in pngs] == ["a-red-circle-1.png", "a-red-circle-2.png"]
    assert (tmp_path / "one" / "a-red-circle-1-grid.png").is_file()
    for png in pngs:
        record = json.loads(png.with_suffix(".json").read_text())
        assert record["query"] == {"prompt": "a red circle"} and record["seed"] == int(png.stem[-1])
        assert record["model"]["fingerprint"] and record["model"]["name_or_path"] == str(setup["model"].resolve())
        assert [d["name"] for d in record["databases"]] == ["A"] and record["databases"][0]["fingerprint"]
        assert len(record["neighbours"]) == 4 and all(Path(h["path"]).parent.name == "picsA"
                                                      for h in record["neighbours"])
        assert record["scheduler"]["name"] == "DDIMScheduler" and record["scheduler"]["num_inference_steps"] == 5
        assert record["scheduler"]["guidance_scale"] == 5.0 and record["size"] == {"height": 128, "width": 128}
        assert {"torch", "diffusers", "open_clip_torch", "rdm"} <= record["versions"].keys()
        assert np.array_equal(pixels(png), pixels(tmp_path / "two" / png.name))  # same seed, same image
    assert not np.array_equal(pixels(pngs[0]), pixels(pngs[1]))  # seeds 1 and 2


def test_eta_one_samples_ancestrally_seeded_and_recorded(setup, tmp_path):
    for out in ("one", "two"):
        sample(setup, tmp_path / out, "--db", "A", "--eta", "1", *FAST)
    sample(setup, tmp_path / "det", "--db", "A", *FAST)
    record = json.loads((tmp_path / "one" / "a-red-circle-1.json").read_text())
    assert record["scheduler"]["eta"] == 1.0
    assert np.array_equal(pixels(tmp_path / "one" / "a-red-circle-1.png"), pixels(tmp_path / "two" / "a-red-circle-1.png"))
    assert not np.array_equal(pixels(tmp_path / "one" / "a-red-circle-1.png"), pixels(tmp_path / "det" / "a-red-circle-1.png"))
    assert sample(setup, tmp_path / "bad", "--eta", "2", *FAST, ok=False).exit_code == 2


def test_another_database_gives_other_neighbours_and_image(setup, tmp_path):
    sample(setup, tmp_path / "a", "--db", "A", *FAST)
    sample(setup, tmp_path / "b", "--db", "B", *FAST)
    a, b = (json.loads((tmp_path / d / "a-red-circle-1.json").read_text()) for d in ("a", "b"))
    assert {h["database"] for h in b["neighbours"]} == {"B"}
    assert {h["path"] for h in a["neighbours"]}.isdisjoint(h["path"] for h in b["neighbours"])
    image_a, image_b = (pixels(tmp_path / d / "a-red-circle-1.png") for d in ("a", "b"))
    assert not np.array_equal(image_a, image_b)


def test_weighted_databases_and_no_database(setup, tmp_path):
    sample(setup, tmp_path / "w", "--db", "A", "--db", "B:0.3", *FASTER)
    record = json.loads((tmp_path / "w" / "a-red-circle-1.json").read_text())
    assert [(d["name"], d["k_drawn"]) for d in record["databases"]] == [("A", 3), ("B", 1)]
    sample(setup, tmp_path / "none", "--db", "none", *FASTER)
    record = json.loads((tmp_path / "none" / "a-red-circle-1.json").read_text())
    assert record["neighbours"] == [] and record["databases"] == []


def test_k_beyond_the_database_warns_once_and_is_recorded(setup, tmp_path):
    result = sample(setup, tmp_path, "--db", "A", "-k", "40", *FASTER)
    assert result.output.count("warning: k=40 neighbours asked of database A, which holds only 12 items") == 1
    record = json.loads((tmp_path / "a-red-circle-1.json").read_text())
    assert record["k"] == 12 and "only 12 items" in record["warnings"][0]


def test_image_query_and_reference_images(setup, tmp_path):
    query = setup["root"] / "picsB" / "img003.png"
    rdm("--indexes", setup["home"], "sample", "--image", query, "--db", "B", "--model", setup["model"], "--out",
        tmp_path / "img", *FASTER)
    record = json.loads((tmp_path / "img" / "img003-1.json").read_text())
    assert record["query"] == {"image": str(query)} and record["neighbours"][0]["id"] == "img003.png"
    refs = [setup["root"] / "picsA" / f"img00{i}.png" for i in (1, 2)]
    sample(setup, tmp_path / "refs", "--ref", refs[0], "--ref", refs[1], *FASTER)
    record = json.loads((tmp_path / "refs" / "a-red-circle-1.json").read_text())
    assert sorted(h["ref"] for h in record["neighbours"]) == sorted(map(str, refs))
    result = sample(setup, tmp_path / "bad", "--ref", refs[0], "--db", "A", *FASTER, ok=False)
    assert result.exit_code == 1 and "--ref" in result.output


def test_compare_writes_one_grid_row_per_database(setup, tmp_path):
    out = tmp_path / "cmp" / "grid.png"
    rdm("--indexes", setup["home"], "compare", "a red circle", "--db", "A", "--db", "B", "--db", "none", "--model",
        setup["model"], "-n", "2", "--out", out, *FASTER)
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["db"] for r in record["rows"]] == ["A", "B", "none"] and record["seeds"] == [1, 2]
    assert [len(r["images"]) for r in record["rows"]] == [2, 2, 2]
    assert [r["images"][0]["seed"] for r in record["rows"]] == [1, 1, 1]
    with Image.open(out) as sheet:
        assert sheet.height == 30 + PAD + 3 * (160 + LABEL_H + PAD)  # title, then three rows of 160 px tiles


def test_style_scale_in_sample_and_compare_is_recorded_and_zero_is_the_query_alone(setup, tmp_path):
    sample(setup, tmp_path / "plain", "--db", "A", *FASTER)
    sample(setup, tmp_path / "zero", "--db", "A", "--style-scale", "0", *FASTER)
    sample(setup, tmp_path / "four", "--db", "A", "--style-scale", "4", *FASTER)
    records = {d: json.loads((tmp_path / d / "a-red-circle-1.json").read_text()) for d in ("plain", "zero", "four")}
    assert [records[d]["scheduler"]["style_scale"] for d in ("plain", "zero", "four")] == [None, 0.0, 4.0]
    images = {d: pixels(tmp_path / d / "a-red-circle-1.png") for d in records}
    assert not np.array_equal(images["zero"], images["four"]) and not np.array_equal(images["plain"], images["four"])
    # the query alone: the neighbours retrieved from A or from B make no difference at style scale 0
    sample(setup, tmp_path / "zeroB", "--db", "B", "--style-scale", "0", *FASTER)
    assert np.abs(pixels(tmp_path / "zeroB" / "a-red-circle-1.png") - images["zero"]).max() <= 1
    out = tmp_path / "cmp" / "grid.png"
    rdm("--indexes", setup["home"], "compare", "a red circle", "--db", "A", "--db", "none", "--model", setup["model"],
        "--style-scale", "2", "--out", out, *FASTER)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["images"][0]["scheduler"]["style_scale"] for r in rows] == [2.0, 2.0]


def test_errors_are_clear(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("RDM_MODEL", raising=False)
    result = rdm("--indexes", setup["home"], "sample", "a red circle", "--db", "A", ok=False)
    assert result.exit_code == 1 and "--model PATH or set $RDM_MODEL" in result.output
    result = rdm("--indexes", setup["home"], "sample", "a red circle", "--model", setup["model"], ok=False)
    assert result.exit_code == 1 and "--db none" in result.output
    result = rdm("--indexes", setup["home"], "sample", "a red circle", "--model", setup["model"], "--db", "C",
                 ok=False)
    assert result.exit_code == 1 and "existing: A, B" in result.output
    result = rdm("--indexes", setup["home"], "sample", "a red circle", "--model", setup["model"], "--db", "A",
                 "--height", "100", ok=False)
    assert result.exit_code == 1 and "multiple of 16" in result.output and "Traceback" not in result.output


class RunsShell:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parity  # the CompVis config it is converted with
def test_convert_refuses_a_checkpoint_that_would_run_a_command(setup, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": RunsShell(marker)}, ckpt)
    result = rdm("convert", ckpt, "--config", need(GOLDEN / "config.yaml"), "--clip", setup["clip"], "--out",
                 tmp_path / "m", ok=False)
    assert result.exit_code == 1 and "error:" in result.output and "system" in result.output
    assert not marker.exists() and not (tmp_path / "m").exists()


@pytest.mark.parity
def test_convert_without_the_clip_records_its_id_and_dim(tmp_path, monkeypatch):
    from rdm.errors import EmbedderUnavailable

    def offline(model_id, *args):
        raise EmbedderUnavailable(f"cannot load CLIP '{model_id}': the hub is unreachable")

    monkeypatch.setattr("rdm.sampling.generate.load_embedder", offline)
    result = rdm("convert", need(GOLDEN / "model.ckpt"), "--config", GOLDEN / "config.yaml", "--out", tmp_path / "m")
    assert "note: CLIP ViT-L-14:openai could not be loaded" in result.output
    config = json.loads((tmp_path / "m" / "rdm_config.json").read_text())
    assert config["embedder"] == {"model": "ViT-L-14:openai", "dim": 32}
