"""Image-to-image, inpainting and outpainting: strength's two ends, the mask's paste-back, the outpainted canvas,
seeds, provenance, and bad input (rdm.sampling.editing, RDMPipeline's init_image, rdm sample / compare --init-image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from rdm import api
from rdm.cli import main as cli
from rdm.errors import RDMError
from rdm.models.tiny import make_tiny_rdm
from rdm.sampling.editing import feather_mask, parse_aspect, parse_extend, prepare_edit
from rdm.sampling.pipeline import RDMPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def picture(w=16, h=16, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    ImageDraw.Draw(im).ellipse((2, 2, w - 3, h - 3), fill=(200, 30, 30))
    return im


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("edit")
    identity = api.load_embedder(tiny_clip).identity.to_dict()
    p = RDMPipeline.from_pretrained(make_tiny_rdm(root / "model", identity, k=3))
    p.set_progress_bar_config(disable=True)
    picture().save(root / "photo.png")
    return p, root


def run(p, **kw):
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "seed": 5, "output_type": "np", **kw}
    return p("a red circle", **kw)


# --- strength --------------------------------------------------------------------------------------

def test_strength_zero_returns_the_input_exactly_in_pixel_space(pipe):
    p, root = pipe
    out = run(p, init_image=root / "photo.png", strength=0.0)
    assert np.array_equal(np.round(out.images[0] * 255).astype(np.uint8), np.asarray(picture()))
    assert out.provenance[0].edit["steps_run"] == 0


def test_strength_one_is_text_to_image_with_the_same_seed(pipe):
    p, root = pipe
    plain = run(p).images
    edited = run(p, init_image=root / "photo.png", strength=1.0)
    assert np.array_equal(plain, edited.images)
    assert edited.provenance[0].edit["steps_run"] == 4


def test_strength_runs_steps_times_strength_and_moves_away_from_the_input(pipe):
    p, root = pipe
    seen, distances = [], []
    for s in (0.25, 0.5, 1.0):
        out = run(p, init_image=root / "photo.png", strength=s, callback=lambda i, t, x: seen.append(s))
        distances.append(np.abs(out.images[0] - np.asarray(picture()) / 255).mean())
        assert out.provenance[0].edit["steps_run"] == int(4 * s)
    assert [seen.count(s) for s in (0.25, 0.5, 1.0)] == [1, 2, 4]
    assert distances[0] < distances[2]  # a light touch stays nearer the input than starting from noise


def test_the_same_seed_gives_the_same_image_and_another_seed_another(pipe):
    p, root = pipe
    a = run(p, init_image=root / "photo.png", strength=0.75).images
    b = run(p, init_image=root / "photo.png", strength=0.75).images
    c = run(p, init_image=root / "photo.png", strength=0.75, seed=6).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_strength_zero_returns_the_autoencoders_round_trip_in_latent_space(pipe):
    from diffusers import AutoencoderKL

    p, root = pipe
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32).eval()
    latent = RDMPipeline(unet=p.unet, vae=vae, scheduler=p.scheduler, rdm_config=p.rdm_config)
    latent.embedder = p.embedder
    latent.set_progress_bar_config(disable=True)
    big = picture(32, 32)
    out = latent("a red circle", init_image=big, strength=0.0, num_inference_steps=4, seed=1, output_type="pt",
                 height=32, width=32)
    x = torch.from_numpy(np.asarray(big, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        trip = ((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out.images, trip, atol=1e-5)


# --- inpainting and outpainting --------------------------------------------------------------------

def test_pixels_outside_the_mask_are_unchanged_and_inside_they_change(pipe):
    p, root = pipe
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 8:] = 1
    for feather in (0.0, 3.0):
        out = run(p, init_image=root / "photo.png", mask_image=mask, strength=1.0, mask_feather=feather)
        got = np.round(out.images[0] * 255).astype(np.uint8)
        original = np.asarray(picture())
        assert np.array_equal(got[mask == 0], original[mask == 0])
        assert np.abs(got[mask == 1].astype(int) - original[mask == 1]).mean() > 5
        rec = out.provenance[0].edit["mask"]
        assert rec["coverage"] == pytest.approx(mask.mean()) and rec["feather"] == feather and len(rec["sha256"]) == 64


def test_a_mask_of_another_size_is_resized_and_said(pipe, tmp_path):
    p, root = pipe
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((32, 0, 63, 63), fill=255)
    m.save(tmp_path / "mask.png")
    out = run(p, init_image=root / "photo.png", mask_image=tmp_path / "mask.png", strength=1.0)
    got = np.round(out.images[0] * 255).astype(np.uint8)
    assert np.array_equal(got[:, :8], np.asarray(picture())[:, :8])
    assert any("mask resized from 64x64" in n for n in out.provenance[0].edit["notes"])


def test_an_outpainted_image_keeps_the_original_in_its_place(pipe, tmp_path):
    p, _ = pipe
    small = picture(12, 16, seed=3)
    small.save(tmp_path / "small.png")
    out = run(p, init_image=tmp_path / "small.png", extend="2,0,2,0")
    got = np.round(out.images[0] * 255).astype(np.uint8)
    assert got.shape == (16, 16, 3)
    assert np.array_equal(got[:, 2:14], np.asarray(small))  # in place, pixel for pixel
    assert not np.array_equal(got[:, :2], np.repeat(np.asarray(small)[:, :1], 2, 1))  # the border was drawn
    edit = out.provenance[0].edit
    assert edit["extend"] == {"left": 2, "top": 0, "right": 2, "bottom": 0} and edit["strength"] == 1.0
    wide = run(p, init_image=tmp_path / "small.png", aspect="2:1", output_type="pil")
    assert wide.images[0].size == (16, 8)  # 24x12 at the model's 16 pixels, aspect kept


def test_provenance_names_the_input_and_settings(pipe):
    p, root = pipe
    import hashlib

    out = run(p, init_image=root / "photo.png", strength=0.5)
    edit = out.provenance[0].to_dict()["edit"]
    assert edit["init_image"]["sha256"] == hashlib.sha256((root / "photo.png").read_bytes()).hexdigest()
    assert edit["init_image"]["name"] == "photo.png" and str(root) not in json.dumps(edit)  # no server path
    assert edit["strength"] == 0.5 and edit["query_from"] == "prompt"
    alone = p(init_image=root / "photo.png", strength=0.5, num_inference_steps=2, seed=0, output_type="np")
    assert alone.provenance[0].edit["query_from"] == "init_image" and "image" in alone.provenance[0].query


# --- bad input -------------------------------------------------------------------------------------

def test_bad_edits_are_refused_with_a_clear_message(pipe, tmp_path):
    p, root = pipe
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (dict(init_image=tmp_path / "notes.txt"), "cannot read init image"),
        (dict(init_image=root / "photo.png", strength=1.5), "strength must be in [0, 1]"),
        (dict(init_image=root / "photo.png", strength=float("nan")), "strength must be in [0, 1]"),
        (dict(init_image=root / "photo.png", mask_image=np.zeros((16, 16))), "the mask is empty"),
        (dict(init_image=root / "photo.png", mask_image=tmp_path / "notes.txt"), "cannot read mask"),
        (dict(strength=0.5), "give init_image"),
        (dict(init_image=root / "photo.png", extend="1,2"), "LEFT,TOP,RIGHT,BOTTOM"),
        (dict(init_image=root / "photo.png", extend="100,0,0,0"), "more than 4x"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RDMError, match=message.replace("[", r"\[").replace("]", r"\]")):
            run(p, **kwargs)
    full = run(p, init_image=root / "photo.png", mask_image=np.ones((16, 16)), strength=0.5)
    assert any("whole image" in n for n in full.provenance[0].edit["notes"])


def test_a_large_input_is_fitted_with_its_aspect_kept(tmp_path):
    picture(400, 200).save(tmp_path / "big.png")
    edit = prepare_edit(tmp_path / "big.png", 0.5, resolution=64, multiple=8)
    assert edit.image.size == (64, 32) and "resized from 400x200 to 64x32" in edit.notes[0]


def test_parsers_and_feather():
    assert parse_extend("8") == (8, 8, 8, 8) and parse_extend("0,0,16,0") == (0, 0, 16, 0)
    assert parse_aspect("16:9") == pytest.approx(16 / 9)
    with pytest.raises(RDMError):
        parse_aspect("0:1")
    hard = np.zeros((20, 20), bool)
    hard[5:15, 5:15] = True
    soft = feather_mask(hard, 2.0)
    assert (soft[~hard] == 0).all() and soft[10, 10] == pytest.approx(1.0, abs=1e-3) and 0 < soft[5, 10] < 1


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_restyles_an_image_and_compares_it_across_databases(pipe, tmp_path, tiny_clip):
    p, root = pipe
    model = root / "model"
    runner = CliRunner()
    res = runner.invoke(cli, ["sample", "--model", str(model), "--db", "none", "--init-image", str(root / "photo.png"),
                              "--strength", "0.5", "--steps", "2", "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    record = json.loads(next((tmp_path / "out").glob("photo-0.json")).read_text())
    assert record["edit"]["strength"] == 0.5 and record["edit"]["query_from"] == "init_image"
    res = runner.invoke(cli, ["sample", "a cat", "--model", str(model), "--db", "none", "--mask",
                              str(root / "photo.png")])
    assert res.exit_code != 0 and "give --init-image" in res.output
    res = runner.invoke(cli, ["compare", "--model", str(model), "--db", "none", "--db", "none", "--init-image",
                              str(root / "photo.png"), "--steps", "2", "--out", str(tmp_path / "cmp.png"), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["images"][0]["edit"]["init_image"]["name"] == "photo.png"
    assert not list(tmp_path.glob("*.tmp*"))
