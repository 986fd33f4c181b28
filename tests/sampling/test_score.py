"""rdm score: toy-art style databases built with the bundled demo CLIP, unseen toy art of known style and
content, and samples of the bundled demo model with rising --style-scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rdm import api
from rdm.cli import main as cli
from rdm.db.database import Database
from rdm.demo.evaluate import build_style_databases
from rdm.demo.run import DEMO_CLIP, DEMO_MODEL, DEMO_START
from rdm.demo.toyart import ToyArtSpec, generate, make_caption, read_metadata
from rdm.errors import RDMError
from rdm.sampling.score import ScoreOptions, fit_logistic, score, score_images, train_probe

STYLES = ("flat", "outline", "neon")
CLIP = f"local-dir:{DEMO_CLIP}"
SPEC = ToyArtSpec(size=64)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A database of 40 toy-art items per style (demo CLIP), and 6 unseen items per style to score."""
    root = tmp_path_factory.mktemp("score")
    indexes = str(root / "indexes")
    build_style_databases(CLIP, root / "db", 40, "{style}", STYLES, indexes, start=DEMO_START, spec=SPEC)
    unseen = {}
    for style in STYLES:
        folder = generate(SPEC, 6, root / "unseen" / style, styles=[style], start=DEMO_START + 5000)
        unseen[style] = [(folder / row["file_name"], row) for row in read_metadata(folder)]
    textured = ("flat", "dotted", "mosaic")  # styles the bundled demo model tells apart best
    build_style_databases(CLIP, root / "db", 40, "{style}", ("dotted", "mosaic"), indexes, start=DEMO_START, spec=SPEC)
    return {"root": root, "indexes": indexes, "unseen": unseen, "dbs": [Database.open(s, indexes) for s in STYLES],
            "textured": [Database.open(s, indexes) for s in textured]}


def test_the_probe_separates_the_toy_styles_it_is_trained_on(toy):
    probe = train_probe(toy["dbs"])
    assert probe.heldout_accuracy >= 0.9 and probe.counts["per_database"] == {s: 40 for s in STYLES}
    again = train_probe(toy["dbs"])
    assert np.array_equal(again.weight.numpy(), probe.weight.numpy())  # seeded split, deterministic fit
    for style in STYLES:
        report = score_images([p for p, _ in toy["unseen"][style]], toy["dbs"], ScoreOptions(target=style, k=8))
        assert report.summary["probe_accuracy"] >= 0.8, (style, report.table())
        assert report.summary["probe_target_probability"] > 0.5
        assert all(abs(sum(s.probe.values()) - 1) < 1e-5 for s in report.images)


def test_retrieval_precision_points_to_the_target(toy):
    for style in STYLES:
        report = score_images([p for p, _ in toy["unseen"][style]], toy["dbs"], ScoreOptions(target=style, k=8))
        # chance is 1/3; the demo CLIP's neighbours share content across styles too (0.56-0.69 here)
        assert report.k == 8 and report.summary["retrieval_precision"] >= 0.5, (style, report.table())
        assert all(abs(sum(s.retrieval.values()) - 1) < 1e-9 for s in report.images)
        others = [report.summary["retrieval"][o] for o in STYLES if o != style]
        assert report.summary["retrieval_precision"] > max(others)


def test_content_similarity_prefers_the_right_prompt(toy):
    paths, rows = zip(*toy["unseen"]["flat"])
    right = [score_images([p], toy["dbs"][:1], ScoreOptions(prompt=make_caption(r["shape"], r["colour"]))).summary
             ["content"] for p, r in zip(paths, rows)]
    wrong = [score_images([p], toy["dbs"][:1], ScoreOptions(prompt=make_caption(r["shape"], other))).summary["content"]
             for p, r in zip(paths, rows) for other in ("red", "blue") if other != r["colour"]][:len(paths)]
    assert np.mean(right) > np.mean(wrong)


def test_cli_score_table_and_json(toy):
    images = [str(p) for p, _ in toy["unseen"]["neon"]]
    args = ["--indexes", toy["indexes"], "score", *images, *sum((["--db", s] for s in STYLES), []), "--target", "neon",
            "--prompt", "a red star", "-k", "5"]
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "nn:neon" in table.output and "probe:flat" in table.output and "target neon: retrieval precision" in \
        table.output and "content: mean CLIP similarity with 'a red star'" in table.output
    as_json = CliRunner().invoke(cli, args + ["--json"])
    report = json.loads(as_json.output)
    assert report["format"] == "rdm-score" and report["databases"] == list(STYLES) and report["k"] == 5
    assert len(report["images"]) == 6 and report["summary"]["retrieval_precision"] >= 0.5
    folder = CliRunner().invoke(cli, ["--indexes", toy["indexes"], "score", str(Path(images[0]).parent), "--db",
                                      "neon", "--json"])
    assert len(json.loads(folder.output)["images"]) == 6  # a folder scores every image in it


def test_clear_errors(toy, tmp_path, tiny_clip):
    image = str(toy["unseen"]["flat"][0][0])
    with pytest.raises(RDMError, match="--target dotted is not one of the databases scored against: flat"):
        score([image], ["flat", "neon"], ScoreOptions(target="dotted"), indexes=toy["indexes"])
    with pytest.raises(RDMError, match="no such image or folder"):
        score([str(tmp_path / "nope.png")], ["flat"], indexes=toy["indexes"])
    api.build_index(str(toy["root"] / "db" / "flat"), name="tiny", clip=tiny_clip, indexes=toy["indexes"], workers=0,
                    progress=False)
    with pytest.raises(RDMError, match="different CLIPs"):
        score([image], ["flat", "tiny"], indexes=toy["indexes"])
    result = CliRunner().invoke(cli, ["--indexes", toy["indexes"], "score", image, "--db", "flat", "--db", "flat"])
    assert result.exit_code == 1 and "each database once" in result.output and "Traceback" not in result.output


def test_logistic_fit_is_a_separating_linear_probe():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g) + 3, torch.randn(50, 4, generator=g) - 3])
    y = torch.tensor([0] * 50 + [1] * 50)
    w, b = fit_logistic(x, y, 2, l2=1e-4)
    assert ((x @ w + b).argmax(1) == y).all()


def test_raising_style_scale_moves_retrieval_precision_towards_the_target(toy):
    """The bundled demo model, the same prompts and seeds with each style's database, at s_nn = 0 (the prompt
    alone) and s_nn = 3 (= the guidance scale, plain guidance): the samples move towards their database."""
    from rdm.sampling.pipeline import RDMPipeline

    if not (DEMO_MODEL / "rdm_config.json").is_file():
        pytest.fail(f"the demo model is not bundled in {DEMO_MODEL} (scripts/train_demo.sh makes it)")
    pipe = RDMPipeline.from_pretrained(DEMO_MODEL, embedder=api.load_embedder(CLIP))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star", "a blue circle", "a green heart", "a yellow square"]
    dbs = toy["textured"]
    probe = train_probe(dbs)
    measured = {}
    for s_nn in (0.0, 3.0):
        reports = []
        for db in dbs:
            images = pipe(prompt=prompts, databases=db, num_inference_steps=8, scheduler="ddim-trailing",
                          guidance_scale=3.0, style_scale=s_nn, seed=0).images
            reports.append(score_images(images, dbs, ScoreOptions(target=db.name, k=8), embedder=pipe.embedder,
                                        probe=probe).summary)
        measured[s_nn] = {key: float(np.mean([r[key] for r in reports]))
                          for key in ("retrieval_precision", "probe_accuracy")}
    assert measured[3.0]["retrieval_precision"] > measured[0.0]["retrieval_precision"] + 0.05, measured
    assert measured[3.0]["probe_accuracy"] >= measured[0.0]["probe_accuracy"] + 0.25, measured


def test_score_with_a_model_samples_each_database_and_scores_the_swap(toy):
    """rdm score --model: the bundled demo model's swap at its own settings, judged by the probe; a cell with the
    style switched off (style scale 0: the query alone, the same image for every database) scores chance."""
    run = lambda *a: CliRunner().invoke(cli, ["--indexes", toy["indexes"], "score", "--model", str(DEMO_MODEL),  # noqa: E731
                                              *[x for s in STYLES for x in ("--db", s)], "--prompt", "a red star",
                                              "--prompt", "a blue heart", "--seeds", "3", "--json", *a],
                                        catch_exceptions=False)
    result = run()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (cell,) = report["cells"]
    assert cell["label"] == "model's defaults" and cell["images"] == 2 * len(STYLES)
    assert cell["probe_accuracy"] >= 0.8 and set(cell["databases"]) == set(STYLES), cell
    off = json.loads(run("--style-scale", "0").output)["cells"][0]
    assert off["label"] == "as given" and off["style_scale"] == 0.0
    assert off["probe_accuracy"] <= 0.5, off  # one image for all three databases: right for at most one of them
    for args, words in ((["--grid", "--steps", "3"], "--grid sets the sampler"),):
        bad = run(*args)
        assert bad.exit_code != 0 and words in bad.output
    no_prompt = CliRunner().invoke(cli, ["--indexes", toy["indexes"], "score", "--model", str(DEMO_MODEL), "--db",
                                         "flat"])
    assert no_prompt.exit_code != 0 and "--prompt" in no_prompt.output
