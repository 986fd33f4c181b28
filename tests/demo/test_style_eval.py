"""The style-swap proof and its judge: exact bookkeeping with injected samplers, a classifier that learns."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from rdm.demo.classifier import (
    HEADS,
    LABELS,
    Augment,
    ClassifierConfig,
    ClassifierTrainConfig,
    ToyArtClassifier,
    augment,
    render_labelled,
    train_classifier,
)
from rdm.demo.evaluate import (
    CONTROL,
    StyleSwapConfig,
    contact_sheet,
    content_grid,
    pipeline_sampler,
    run_style_swap,
    sample_seed,
)
from rdm.demo.toyart import COLOURS, SHAPES, STYLES, ToyArtSpec, render
from rdm.errors import RDMError

# ---------------------------------------------------------------- fakes: a sampler drawing real toy art


def parse_prompt(prompt: str) -> tuple[str, str]:
    """'a red star' -> ('star', 'red')."""
    *_, colour, shape = prompt.split()
    return shape, colour


def toy_sampler(style_of, wrong_colour_every: int = 0, size: int = 64):
    """A Sampler rendering real toy art of the prompted content in style_of(database, prompt, seed); each image
    carries its true labels in .info for the oracle judge."""

    def sample(prompts, database, seeds):
        images = []
        for prompt, seed in zip(prompts, seeds):
            shape, colour = parse_prompt(prompt)
            if wrong_colour_every and seed % wrong_colour_every == 0:
                colour = tuple(COLOURS)[(tuple(COLOURS).index(colour) + 1) % len(COLOURS)]
            style = style_of(database, prompt, seed)
            rng = np.random.default_rng(seed)
            image = render(shape, colour, style, size, x=rng.uniform(0.4, 0.6), y=rng.uniform(0.4, 0.6),
                           rotation=rng.uniform(-15, 15), rng=rng, supersample=2)
            image.info["labels"] = {"style": style, "shape": shape, "colour": colour}
            images.append(image)
        return images

    return sample


class OracleJudge:
    """Reads the true labels the fake sampler attached: tests the bookkeeping, not the classifier."""

    def predict(self, images):
        return [dict(im.info["labels"]) for im in images]


def obey(database, prompt, seed):
    return database if database is not None else "flat"


def ignore(database, prompt, seed):
    return STYLES[zlib.crc32(f"{prompt}/{seed}".encode()) % len(STYLES)]


DATABASES = {style: style for style in STYLES}  # the fake sampler reads the style off the "database"
SMALL = StyleSwapConfig(contents=content_grid(8), seeds=(0, 1), batch_size=5)

# ---------------------------------------------------------------- evaluation


def test_sampler_that_obeys_the_database_scores_full_marks():
    report = run_style_swap(toy_sampler(obey), DATABASES, OracleJudge(), SMALL)
    s = report["summary"]
    assert s["style_swap_accuracy"] == 1.0 and s["style_swap_accuracy_min"] == 1.0
    assert s["content_accuracy"] == 1.0 and s["all_styles_swapped"] == 1.0
    assert s["style_swap_passed"] and s["content_passed"]
    conf = report["confusion"]
    assert conf["rows"] == list(STYLES) + [CONTROL] and conf["columns"] == list(STYLES)
    assert np.array_equal(np.array(conf["counts"])[:6], np.eye(6, dtype=int) * 16)  # 8 contents x 2 seeds
    assert conf["counts"][6] == [16, 0, 0, 0, 0, 0]  # the control drew flat art only
    assert s["control_style_shares"]["flat"] == 1.0
    assert "| **mean over databases** |" in report["markdown"] and "| neon | 0 | 0 | 0 | 0 | 0 | 16 |" in \
        report["markdown"]
    json.dumps(report)  # the report is plain JSON


def test_sampler_that_ignores_the_database_scores_one_in_six():
    report = run_style_swap(toy_sampler(ignore), DATABASES, OracleJudge(), SMALL)
    s = report["summary"]
    # each (prompt, seed) gets one style whatever the database, so it matches exactly one of the six
    assert s["style_swap_accuracy"] == pytest.approx(1 / 6)
    assert s["all_styles_swapped"] == 0.0 and not s["style_swap_passed"]
    assert s["content_accuracy"] == 1.0
    counts = np.array(report["confusion"]["counts"])
    assert (counts == counts[0]).all()  # every row, the control too, has the same style mix


def test_content_accuracy_counts_shape_and_colour():
    report = run_style_swap(toy_sampler(obey, wrong_colour_every=2), {"neon": "neon", "flat": "flat"},
                            OracleJudge(), StyleSwapConfig(contents=content_grid(4), seeds=(0, 1, 2, 3), control=False))
    s = report["summary"]
    assert s["shape_accuracy"] == 1.0
    assert s["colour_accuracy"] == s["content_accuracy"] == 0.5  # seeds s * 10000 + c: even for even c
    assert not s["content_passed"] and s["style_swap_accuracy"] == 1.0
    assert report["confusion"]["rows"] == ["neon", "flat"] and CONTROL not in report["per_database"]


def test_same_prompts_and_seeds_for_every_database():
    calls = []

    def recording(prompts, database, seeds):
        calls.append((database, list(prompts), list(seeds)))
        return toy_sampler(obey)(prompts, database, seeds)

    run_style_swap(recording, DATABASES, OracleJudge(), SMALL)
    by_database = {}
    for database, prompts, seeds in calls:
        assert len(prompts) <= SMALL.batch_size
        by_database.setdefault(database, []).extend(zip(prompts, seeds))
    assert set(by_database) == set(STYLES) | {None}
    first = by_database["flat"]
    assert all(v == first for v in by_database.values())
    assert len(set(first)) == 16 and ("a red circle", sample_seed(0, 0)) in first


def test_content_grid_balances_shapes_and_colours():
    grid = content_grid(16)
    assert len(set(grid)) == 16
    assert all(sum(s == shape for s, _ in grid) == 2 for shape in SHAPES)
    assert all(sum(c == colour for _, c in grid) == 2 for colour in COLOURS)
    assert len(set(content_grid(64))) == 64


def test_inputs_are_checked():
    with pytest.raises(RDMError, match="keyed by the style"):
        run_style_swap(toy_sampler(obey), {"watercolour": "x"}, OracleJudge(), SMALL)
    with pytest.raises(RDMError, match="returned 1 images"):
        run_style_swap(lambda p, d, s: toy_sampler(obey)(p[:1], d, s[:1]), DATABASES, OracleJudge(), SMALL)
    with pytest.raises(RDMError, match="unknown content"):
        StyleSwapConfig(contents=(("star", "mauve"),))


def test_rdm_score_of_the_rows_follows_the_database_without_a_judge(tmp_path):
    """Real toy-art databases (the bundled demo CLIP) and a sampler drawing real toy art: rdm score's retrieval
    precision and probe accuracy are high when the samples take their database's style, low when they do not."""
    from rdm.db.database import Database
    from rdm.demo.evaluate import build_style_databases, database_scorer
    from rdm.demo.run import DEMO_CLIP, DEMO_START

    styles = ("flat", "neon", "dotted")
    build_style_databases(f"local-dir:{DEMO_CLIP}", tmp_path / "art", 32, "{style}", styles, str(tmp_path / "idx"),
                          start=DEMO_START, spec=ToyArtSpec(size=64))
    databases = {style: Database.open(style, tmp_path / "idx") for style in styles}
    config = StyleSwapConfig(contents=content_grid(4), seeds=(0,))
    scorer = database_scorer(databases, k=5)
    obeying = run_style_swap(toy_sampler(lambda db, p, s: db.name if db is not None else "flat"), databases,
                             OracleJudge(), config, scorer=scorer)
    ignoring = run_style_swap(toy_sampler(lambda db, p, s: "flat"), databases, OracleJudge(), config, scorer=scorer)
    for style in styles:
        score = obeying["per_database"][style]["score"]
        assert score["probe_accuracy"] >= 0.75 and score["retrieval_precision"] > 1 / 3, (style, score)
        assert score["probe_heldout_accuracy"] >= 0.9 and score["k"] == 5 and score["content"] > 0
    assert ignoring["per_database"]["neon"]["score"]["probe_accuracy"] <= 0.25
    assert obeying["summary"]["score"]["probe_accuracy"] > ignoring["summary"]["score"]["probe_accuracy"] + 0.4
    assert "retrieval_precision" not in obeying["per_database"][CONTROL]["score"]  # the control has no target
    assert "rdm score (no judge" in obeying["markdown"]
    json.dumps({k: v for k, v in obeying.items()})  # still plain JSON


def test_pipeline_sampler_passes_one_seed_per_image_and_none_for_the_control():
    class FakePipe:
        def set_progress_bar_config(self, **kw):
            self.progress = kw

        def __call__(self, **kw):
            self.kw = kw
            return type("Out", (), {"images": toy_sampler(obey)(kw["prompt"], "flat", kw["seed"])})()

    pipe = FakePipe()
    sample = pipeline_sampler(pipe, k=4, num_inference_steps=7, guidance_scale=2.0)
    images = sample(["a red star", "a blue circle"], None, [3, 10003])
    assert len(images) == 2 and pipe.progress == {"disable": True}
    assert pipe.kw["databases"] is None and pipe.kw["seed"] == [3, 10003] and pipe.kw["k"] == 4
    assert pipe.kw["num_inference_steps"] == 7 and pipe.kw["output_type"] == "pil"


def test_contact_sheet(tmp_path):
    report = run_style_swap(toy_sampler(obey), {"neon": "neon", "dotted": "dotted"}, OracleJudge(),
                            StyleSwapConfig(contents=content_grid(3), seeds=(0,)), keep_images=True)
    path = contact_sheet(report, tmp_path / "sheet.png", columns=3, size=48)
    assert path.is_file()


# ---------------------------------------------------------------- the judge


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    config = ClassifierTrainConfig(n_train=1024, n_eval=256, epochs=2, batch_size=32, lr=4e-3)
    path = tmp_path_factory.mktemp("judge")
    model, metrics = train_classifier(config, ClassifierConfig(stem=16, widths=(16, 32, 64)), out=path)
    return model, metrics, path


def test_judge_learns_well_beyond_chance(judge):
    _, metrics, _ = judge
    held = metrics["heldout"]
    assert held["style"] > 0.6  # chance 1/6; ~0.9 after these 64 steps
    assert held["colour"] > 0.6  # chance 1/8; ~0.95 (shape needs far longer: the script's full run)
    assert set(metrics["heldout_augmented"]) == set(HEADS) and metrics["n_train"] == 1024


def test_judge_round_trips_and_judges_any_size(judge):
    model, metrics, path = judge
    loaded = ToyArtClassifier.load(path)
    assert loaded.labels == {h: tuple(v) for h, v in LABELS.items()} and loaded.metrics["heldout"] == metrics["heldout"]
    images = toy_sampler(obey)(["a red star", "a green hexagon"], "neon", [1, 2])
    assert loaded.predict(images) == model.predict(images)
    big = toy_sampler(obey, size=128)(["a red star"], "neon", [1])
    (pred,) = loaded.predict(big)
    assert pred["style"] in STYLES and 0 < pred["style_prob"] <= 1
    with pytest.raises(RDMError, match="not a toy-art classifier"):
        ToyArtClassifier.load(path / "nothing")


def test_augment_is_seeded_bounded_and_identity_when_off():
    (images, targets), = render_labelled(ToyArtSpec(), 8)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64)
    assert [LABELS["style"][i] for i in targets["style"]][:1] and len(targets["shape"]) == 8
    x = images.float() / 255
    a = augment(x, Augment(), torch.Generator().manual_seed(0))
    b = augment(x, Augment(), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    off = Augment(blur_prob=0, noise_std=0, shift=0, zoom=0, turn=0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, off, torch.Generator().manual_seed(0)), x, atol=1e-5)
    tinted = augment(x, replace(off, tint=0.4), torch.Generator().manual_seed(0))
    again = augment(x, replace(off, tint=0.4), torch.Generator().manual_seed(0))
    assert torch.equal(tinted, again) and not torch.allclose(tinted, x, atol=1e-3)
    assert (tinted - x).abs().max() <= 0.4 + 1e-6  # a blend of weight <= 0.4 towards a colour in [0, 1]


def test_render_labelled_alternates_sizes():
    groups = render_labelled(ToyArtSpec(), 5, sizes=(64, 128))
    assert [g[0].shape for g in groups] == [(3, 3, 64, 64), (2, 3, 128, 128)]


# ---------------------------------------------------------------- the real pipeline, end to end


def test_real_pipeline_with_per_style_databases(tmp_path, tiny_clip, judge):
    """A random tiny pixel-space RDM, two toy-art databases built by build_style_databases, the trained judge."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from rdm.demo.evaluate import build_style_databases, open_style_databases
    from rdm.embed.embedder import Embedder
    from rdm.models.format import RDMConfig, save_model_folder
    from rdm.sampling.pipeline import RDMPipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    identity = Embedder.load(tiny_clip, dtype="float32").identity.to_dict()
    config = RDMConfig(embedder=identity, embedding_dim=32, resolution=32, latent_channels=3, k=2)
    save_model_folder(tmp_path / "model", unet, None, DDIMScheduler(), config)
    indexes = str(tmp_path / "indexes")
    names = build_style_databases(tiny_clip, tmp_path / "art", 6, styles=("flat", "neon"), indexes=indexes)
    assert names == {"flat": "toyart-flat", "neon": "toyart-neon"}

    pipe = RDMPipeline.from_pretrained(tmp_path / "model")
    sampler = pipeline_sampler(pipe, k=2, num_inference_steps=2, indexes=indexes)
    databases = open_style_databases("toyart-{style}", ("flat", "neon"), indexes)
    report = run_style_swap(sampler, databases, judge[0], StyleSwapConfig(contents=content_grid(2), seeds=(0, 1)),
                            keep_images=True)
    assert report["confusion"]["rows"] == ["flat", "neon", CONTROL]
    assert [sum(row) for row in report["confusion"]["counts"]] == [4, 4, 4]
    # every sample is seeded on its own: redrawing one control sample alone gives the same pixels
    first = [r for r in report["samples"] if r["database"] == CONTROL][0]
    again = sampler([first["prompt"]], None, [first["seed"]])[0]
    assert first["prompt"] == "a red circle" and again.size == (32, 32)
    assert np.array_equal(np.asarray(again), np.asarray(report["images"][CONTROL][0]))
    with pytest.raises(RDMError, match="template"):
        open_style_databases("toyart", ("flat",), indexes)


# ---------------------------------------------------------------- the blind judges (rdm.demo.blind)


def tinted(sampler, rgb=(0.55, 0.75, 0.8), weight=0.5):
    """The same sampler with every image blended towards one colour: the old demo's seed-tinted background."""
    from PIL import Image

    def sample(prompts, database, seeds):
        out = []
        for im in sampler(prompts, database, seeds):
            a = np.asarray(im, np.float32) / 255 * (1 - weight) + np.asarray(rgb, np.float32) * weight
            t = Image.fromarray((a * 255).round().astype(np.uint8))
            t.info["labels"] = im.info["labels"]
            out.append(t)
        return out

    return sample


def test_border_colour_is_the_frame_of_toy_art():
    from rdm.demo.blind import border_error, border_rgb
    from rdm.demo.toyart import DARK_BG, LIGHT_BG

    flat = render("star", "red", "flat", 64, rng=np.random.default_rng(0))
    neon = render("star", "red", "neon", 64, rng=np.random.default_rng(0))
    assert np.allclose(border_rgb(flat), LIGHT_BG, atol=0.01) and np.allclose(border_rgb(neon), DARK_BG, atol=0.01)
    assert border_error([flat], border_rgb(neon))[0] == pytest.approx(LIGHT_BG - DARK_BG, abs=0.01)
    with pytest.raises(RDMError, match="RGB image"):
        border_rgb(np.zeros((8, 8)))


def test_run_style_swap_reports_border_error_against_each_database():
    from rdm.demo.blind import border_rgb

    refs = {s: border_rgb(render("circle", "blue", s, 64, rng=np.random.default_rng(1))) for s in DATABASES}
    clean = run_style_swap(toy_sampler(obey), DATABASES, OracleJudge(), SMALL, reference_borders=refs)
    tint = run_style_swap(tinted(toy_sampler(obey)), DATABASES, OracleJudge(), SMALL, reference_borders=refs)
    assert clean["summary"]["border_error"] < 0.02 and clean["summary"]["border_passed"]
    assert tint["summary"]["border_error"] > 0.1 and not tint["summary"]["border_passed"]
    assert "border error" in tint["markdown"]
    control = tint["per_database"][CONTROL]  # no database, so no reference colour: measured, not scored
    assert "border_rgb" in control and "border_error" not in control


@pytest.fixture(scope="module")
def demo_centroids():
    from rdm import api
    from rdm.demo.blind import CentroidJudge
    from rdm.demo.run import DEMO_CLIP

    return CentroidJudge.from_toyart(api.load_embedder(f"local-dir:{DEMO_CLIP}"), n_per_style=24)


def test_nearest_centroid_judge_places_clean_toy_art_and_is_fooled_by_tints(demo_centroids):
    obeying = run_style_swap(toy_sampler(obey), DATABASES, OracleJudge(), SMALL, centroids=demo_centroids)
    ignoring = run_style_swap(toy_sampler(ignore), DATABASES, OracleJudge(), SMALL, centroids=demo_centroids)
    assert obeying["summary"]["centroid_accuracy"] >= 0.9 and obeying["summary"]["centroid_passed"]
    assert ignoring["summary"]["centroid_accuracy"] <= 0.5
    # a dark tint over light styles drags them towards neon, the dark one: the judge learned nothing to ignore it
    dark = run_style_swap(tinted(toy_sampler(obey), rgb=(0.05, 0.05, 0.1), weight=0.8), DATABASES, OracleJudge(),
                          SMALL, centroids=demo_centroids)
    assert dark["summary"]["centroid_accuracy"] < obeying["summary"]["centroid_accuracy"]


def test_figure_fit_reads_shape_and_colours_of_filled_toy_art():
    """The pixel judge scripts/eval_adapter.py uses: on unseen cutout and flat items it names the drawn shape and
    colour; a figureless image has no shape; a blob fits no shape well."""
    from rdm.demo.blind import figure_fit, nearest_colour
    from rdm.demo.toyart import CUTOUT_GROUND, sample_item

    for style in ("cutout", "flat"):
        spec = ToyArtSpec(styles=(style,))
        for i in range(24):
            image, label = sample_item(spec, 51_000_000 + i)
            fit = figure_fit(image)
            assert fit["shape"] == label["shape"] and fit["iou"] > 0.8, (style, i, fit["ious"])
            colour = nearest_colour(fit["ground_rgb"], CUTOUT_GROUND) if style == "cutout" else \
                nearest_colour(fit["figure_rgb"])
            assert colour == label["colour"]
    assert figure_fit(np.full((64, 64, 3), 0.5, np.float32))["shape"] is None
    blob = np.full((64, 64, 3), 0.9, np.float32)
    yy, xx = np.mgrid[:64, :64]
    rng = np.random.default_rng(0)
    blob[(xx - 32) ** 2 + (yy - 32) ** 2 + rng.normal(0, 90, (64, 64)) < 14 ** 2] = (0.2, 0.3, 0.8)
    assert figure_fit(blob)["iou"] < 0.8  # ragged: below every real item's fit
    with pytest.raises(RDMError, match="square RGB"):
        figure_fit(np.zeros((64, 32, 3), np.float32))
