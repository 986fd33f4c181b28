"""The copy guard: an output that copies a collection item is flagged (result, provenance, CLI) or refused
(--no-copies); ordinary outputs are not (rdm.sampling.copyguard)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rdm.errors import RDMError
from rdm.sampling.copyguard import CopyGuard, pixel_distance
from rdm.sampling.pipeline import RDMPipeline
from tests.helpers.world import run_cli, tiny_collection

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("copy")
    home, model = tiny_collection(root, tiny_clip, 10, 900, "art")
    pipe = RDMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return {"root": root, "home": home, "model": model, "pipe": pipe}


def test_an_output_that_is_a_collection_item_is_flagged_and_an_ordinary_one_is_not(world):
    pipe, item = world["pipe"], world["root"] / "pics" / "img004.png"
    guard = CopyGuard(threshold=0.995)  # a random tiny CLIP puts every picture near every other (~0.98)
    # strength 0 returns the input exactly (a pixel-space model): the output is the item itself
    copy = pipe(init_image=item, strength=0.0, databases="art", indexes=str(world["home"]), seed=0,
                copy_guard=guard)
    verdict = copy.provenance[0].copy_guard
    assert verdict["flagged"] and verdict["nearest"] == {"database": "art", "id": "img004.png"}
    assert verdict["similarity"] > 0.99 and verdict["pixel_distance"] < 0.03  # (resampled to the model's size)
    ordinary = pipe(["a red circle", "a blue square", "a green star"], databases="art", indexes=str(world["home"]), seed=[1, 2, 3],
                    num_inference_steps=4, copy_guard=guard)
    for record in ordinary.provenance:
        g = record.copy_guard
        assert g["flagged"] is False and g["similarity"] < g["threshold"] and g["nearest"]["database"] == "art"
        assert g["pixel_distance"] > 0.03
    # the threshold decides: at -1 everything is a near-copy; off, nothing is checked or recorded
    assert pipe("a red circle", databases="art", indexes=str(world["home"]), seed=1, num_inference_steps=4,
                copy_guard=CopyGuard(threshold=-1.0)).provenance[0].copy_guard["flagged"]
    assert pipe("a red circle", databases="art", indexes=str(world["home"]), seed=1, num_inference_steps=4,
                copy_guard=None).provenance[0].copy_guard == {}


def test_rdm_sample_warns_of_a_near_copy_or_refuses_it_with_no_copies(world, tmp_path):
    item = world["root"] / "pics" / "img004.png"
    base = ["--indexes", world["home"], "sample", "--db", "art", "--model", world["model"], "--init-image", item,
            "--strength", "0", "--quiet"]
    warned = run_cli(*base, "--out", tmp_path / "w")
    assert warned.exit_code == 0 and "copy guard: seed 0: a near-copy of art/img004.png" in warned.output
    record = json.loads(next((tmp_path / "w").glob("img004-0.json")).read_text())
    assert record["copy_guard"]["flagged"] is True
    refused = run_cli(*base, "--out", tmp_path / "r", "--no-copies", ok=False)
    assert refused.exit_code == 1 and "refused 1 near-copy output(s)" in refused.output
    assert not list((tmp_path / "r").glob("*.png"))  # nothing written for it, not even a grid


def test_thresholds_are_checked_and_pixel_distance_is_zero_for_the_same_picture(world):
    with pytest.raises(RDMError, match="cosine in"):
        CopyGuard(threshold=1.5)
    im = Image.open(world["root"] / "pics" / "img001.png")
    assert pixel_distance(im, im) == 0.0
    assert pixel_distance(im, Image.fromarray(255 - np.asarray(im.convert("RGB")))) > 0.1
