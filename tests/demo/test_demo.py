"""rdm demo: the whole demo end to end with a tiny CLIP and a tiny (untrained) 64 px pixel-space RDM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from rdm import api
from rdm.cli import main as cli
from rdm.db.database import Database
from rdm.demo import run as demo_run
from rdm.demo.run import CONTROL, DemoConfig, run_demo
from rdm.demo.toyart import STYLES
from rdm.errors import RDMError
from rdm.images.sheets import LABEL_H, PAD
from rdm.models.convert.compvis import scheduler_config_from_compvis
from rdm.models.format import RDMConfig, save_model_folder
from rdm.sampling.generate import GRID_TILE
from rdm.train.loop import LDM_SCHEDULE

PROMPTS = ("a red star", "a blue circle")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_clip) -> Path:
    """A random 64 px pixel-space U-Net in an rdm model folder that records the tiny CLIP; cross-attention only
    at 16 x 16 (the tiny preset attends at full resolution: 4096 tokens, seconds per step at 64 px)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=3, out_channels=3, cross_attention_dim=32,
                                block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=4)
    scheduler = DDIMScheduler(**scheduler_config_from_compvis(dict(LDM_SCHEDULE, parameterization="eps")))
    identity = api.load_embedder(tiny_clip).identity.to_dict()
    config = RDMConfig(embedder=identity, embedding_dim=32, resolution=64, latent_channels=3, k=2)
    return save_model_folder(tmp_path_factory.mktemp("demo") / "model", unet.eval(), None, scheduler, config)


def test_demo_end_to_end(tiny_model, tiny_clip, tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_model), clip=tiny_clip, prompts=PROMPTS, seeds=2,
                        steps=2, n_per_style=4, progress=False)
    lines = []
    result = run_demo(config, log=lines.append)

    # One row per style database, then the control; a column per (prompt, seed) after the neighbour tiles.
    assert result.rows == [*STYLES, CONTROL]
    prompt_per_image = [p for p in PROMPTS for _ in range(config.seeds)]
    assert [(c["prompt"], c["seed"]) for c in result.columns] == [(p, i) for i, p in enumerate(prompt_per_image)]
    cols = 2 + len(PROMPTS) * config.seeds  # k=2 neighbour tiles (the model's k, less than thumbs=3)
    width = 160 + PAD + cols * (GRID_TILE + PAD)  # sheets.grid: label column, then the tiles
    height = 30 + PAD + len(result.rows) * (GRID_TILE + LABEL_H + PAD)  # title, then the rows
    assert result.grid.is_file() and Image.open(result.grid).size == (width, height)
    assert f"grid: {result.grid}" in "\n".join(lines)

    # The same seeds in every row, and each database row conditioned on its own database.
    seeds = result.seeds[CONTROL]
    assert len(seeds) == len(PROMPTS) * config.seeds == len(set(seeds))
    assert all(result.seeds[row] == seeds for row in result.rows)
    record = json.loads(result.provenance.read_text())
    assert record["format"] == "rdm-demo" and [c["seed"] for c in record["columns"]] == seeds
    assert all(row["seeds"] == seeds and [im["seed"] for im in row["images"]] == seeds for row in record["rows"])

    # The provenance lists every database with its fingerprint, and the model every row used.
    indexes = tmp_path / "demo" / "indexes"
    assert [d["name"] for d in record["databases"]] == list(STYLES)
    for d in record["databases"]:
        db = Database.open(d["name"], indexes)
        assert d["fingerprint"] == db.fingerprint == result.databases[d["name"]] and db.count == 4
    for row in record["rows"]:
        used = {db["name"] for im in row["images"] for db in im["databases"]}
        assert used == ({row["database"]} if row["database"] else set())
        assert all(n["database"] == row["database"] for im in row["images"] for n in im["neighbours"])
        assert {im["model"]["fingerprint"] for im in row["images"]} == {record["model"]["fingerprint"]}
    # Every database holds the same content indices, in its own style.
    first = [Database.open(s, indexes).records([0])[0] for s in STYLES]
    assert len({(r["shape"], r["colour"]) for r in first}) == 1 and [r["style"] for r in first] == list(STYLES)


def test_cli_demo_reruns_into_the_same_folder(tiny_model, tiny_clip, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--model", str(tiny_model), "--clip", tiny_clip, "--prompt", "a red star",
            "--seeds", "1", "--steps", "1", "--styles", "flat,neon", "--quiet"]
    first = CliRunner().invoke(cli, args + ["--n-per-style", "3"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, args + ["--n-per-style", "2"])  # other items: drawn and indexed afresh
    assert again.exit_code == 0, again.output
    assert f"grid: {out / 'demo-grid.png'}" in again.output
    assert [Database.open(s, out / "indexes").count for s in ("flat", "neon")] == [2, 2]
    rows = json.loads((out / "demo-grid.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["flat", "neon", CONTROL]


def test_missing_demo_weights_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_run, "DEMO_MODEL", tmp_path / "assets" / "rdm")
    monkeypatch.setattr(demo_run, "DEMO_CLIP", tmp_path / "assets" / "clip")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "the demo weights are not bundled in this build" in result.output
    assert "bash scripts/train_demo.sh" in result.output and "--model" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_a_clip_the_model_was_not_trained_with_is_refused(tiny_model, tmp_path):
    from rdm.models.tiny import make_tiny_clip

    other = make_tiny_clip(tmp_path / "other_clip", seed=1)
    with pytest.raises(RDMError, match="trained with"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_model), clip=other, progress=False))
