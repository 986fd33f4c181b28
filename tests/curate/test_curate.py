"""rdm curate on a collection with planted problems: copies (resized, JPEG re-encoded, slightly cropped) are found
as near-duplicate groups, off-style items and a photo rank as outliers, nothing is removed without --apply, and
--apply removes exactly what was flagged through the takedown path, recorded in the manifest's history."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rdm import api
from rdm.cli import main
from rdm.curate import CurateOptions, curate, k_center
from rdm.demo.run import DEMO_CLIP
from tests.helpers.world import planted_toyart

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """48 flat toy-art pictures with planted copies, off-style items and a photograph (tests.helpers.world)."""
    root = tmp_path_factory.mktemp("curate")
    copies, off = planted_toyart(root / "flat")
    home = root / "indexes"
    api.build_index(str(root / "flat"), name="flat", clip=f"local-dir:{DEMO_CLIP}", indexes=str(home), workers=0,
                    progress=False)
    return {"root": root, "home": home, "copies": copies, "off": off}


def test_planted_duplicates_and_outliers_are_found(planted):
    db = api.open_database("flat", planted["home"])
    report = curate(db, CurateOptions(k=5))
    pairs_found = {frozenset((g["keep"], d)) for g in report.duplicate_groups for d in g["drop"]}
    planted_pairs = {frozenset((c, o)) for c, o in planted["copies"].items()}
    tp = len(pairs_found & planted_pairs)
    assert tp / len(planted_pairs) >= 0.9, (pairs_found, planted_pairs)  # recall
    assert tp / max(len(pairs_found), 1) >= 0.9, pairs_found - planted_pairs  # precision
    for g in report.duplicate_groups:  # the original (built first) is kept, the copy flagged
        assert g["keep"].startswith("a") and all(d.startswith("z-copy") for d in g["drop"])
    flagged = {o["id"] for o in report.outliers}
    planted_off = set(planted["off"])
    assert len(flagged & planted_off) / len(planted_off) >= 0.9, (report.outliers, report.outlier_rule)
    assert len(flagged & planted_off) / max(len(flagged), 1) >= 0.8, flagged - planted_off
    assert [o["score"] for o in report.outliers] == sorted((o["score"] for o in report.outliers), reverse=True)
    assert len(report.representatives) == 16 and len(set(report.representatives)) == 16
    assert 0 < report.coherence["centroid_similarity"] < report.coherence["knn_similarity"] <= 1


def finds_the_planted(report, exact, planted) -> None:
    """A curation by lists finds the planted copies (no pair the exact search did not find) and off-style items."""
    pairs = lambda r: {frozenset((g["keep"], d)) for g in r.duplicate_groups for d in g["drop"]}  # noqa: E731
    planted_pairs = {frozenset((c, o)) for c, o in planted["copies"].items()}
    assert len(pairs(report) & planted_pairs) >= 0.9 * len(planted_pairs) and pairs(report) <= pairs(exact)
    flagged = {o["id"] for o in report.outliers}
    assert len(flagged & set(planted["off"])) >= 0.9 * len(planted["off"])
    assert len(flagged & set(planted["off"])) >= 0.8 * len(flagged)


def test_an_inverted_file_database_finds_the_same_problems_within_its_lists(planted):
    """With an inverted file (after a rotation, as rdm builds above 200k items with OPQ) the neighbours come from
    each item's 4 nearest lists, not a search of everything: the same planted copies and off-style items are found."""
    api.build_index(str(planted["root"] / "flat"), name="flat-ivf", clip=f"local-dir:{DEMO_CLIP}",
                    indexes=str(planted["home"]), workers=0, progress=False, index_factory="PCAR32,IVF4,Flat")
    db = api.open_database("flat-ivf", planted["home"])
    assert db.coarse_lists(db.vectors_at(np.asarray(db.live_rows())), 2).shape == (db.count, 2)
    exact = curate(api.open_database("flat", planted["home"]), CurateOptions(k=5))
    report = curate(db, CurateOptions(k=5))
    finds_the_planted(report, exact, planted)


def test_a_large_exact_database_is_partitioned_by_kmeans_and_finds_the_same(planted, monkeypatch):
    """Exact databases above PARTITION_ABOVE items get a k-means partition of their own instead of an N x N search
    (here lowered to 10 items so that the 65-item collection takes that path)."""
    import rdm.curate

    db = api.open_database("flat", planted["home"])
    exact = curate(db, CurateOptions(k=5))
    monkeypatch.setattr(rdm.curate, "PARTITION_ABOVE", 10)
    lists = rdm.curate.kmeans_lists(db.vectors_at(np.asarray(db.live_rows())), 2)
    assert lists.shape == (db.count, 2) and len(np.unique(lists[:, 0])) > 2  # ~sqrt(65) lists, in use
    made = []
    monkeypatch.setattr(rdm.curate, "kmeans_lists", lambda *a, **kw: made.append(1) or lists)
    report = curate(db, CurateOptions(k=5))
    assert made == [1]  # the partition was used, not the exact search
    finds_the_planted(report, exact, planted)


def test_nothing_is_removed_without_apply_and_apply_removes_exactly_the_flagged(planted, tmp_path):
    home, runner = planted["home"], CliRunner()
    before = api.open_database("flat", home).count
    out = runner.invoke(main, ["--indexes", str(home), "curate", "flat", "-k", "5", "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert api.open_database("flat", home).count == before  # a report removes nothing
    flags = pq.read_table(tmp_path / "r" / "flags.parquet").to_pylist()
    assert len(flags) == before and {f["id"] for f in flags if f["duplicate_of"]} <= set(planted["copies"])
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 16 and "Near-duplicate groups" in page
    dry = runner.invoke(main, ["--indexes", str(home), "curate", "flat", "-k", "5", "--apply", "duplicates",
                               "--dry-run"])
    assert dry.exit_code == 0 and "would remove" in dry.output
    assert api.open_database("flat", home).count == before
    report = json.loads((tmp_path / "r" / "curate.json").read_text())
    wanted = {d for g in report["duplicate_groups"] for d in g["drop"]}
    done = runner.invoke(main, ["--indexes", str(home), "curate", "flat", "-k", "5", "--apply", "duplicates"])
    assert done.exit_code == 0 and f"removed {len(wanted)} item(s)" in done.output
    db = api.open_database("flat", home)
    assert db.count == before - len(wanted) and not set(db.ids) & wanted
    entry = db.manifest["history"][-1]
    assert entry["action"] == "curate" and entry["kinds"] == ["duplicates"] and set(entry["ids"]) == wanted
    assert all(why.startswith("near-duplicate of a") for why in entry["reasons"].values())
    bad = runner.invoke(main, ["--indexes", str(home), "curate", "flat", "--apply", "everything"])
    assert bad.exit_code != 0 and "--apply takes duplicates, outliers" in bad.output


def test_k_center_covers_the_collection_first_near_the_centroid():
    v = np.array([[1, 0], [0.99, 0.14], [0, 1], [-1, 0]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    chosen = k_center(v, 3)
    assert len(set(chosen)) == 3 and 3 in chosen and 2 in chosen  # the far ones are picked


def test_the_html_report_opens_offline_in_chromium_with_every_thumbnail(planted, tmp_path):
    """The report of the planted collection in headless Chromium: groups, outliers and the style card shown, every
    thumbnail decoded (saves docs/curate-report.png)."""
    from pathlib import Path

    from tests.helpers.browser import ARGS, CHROMIUM
    from tests.helpers.world import REPO

    sync_api = pytest.importorskip("playwright.sync_api")
    api.build_index(str(planted["root"] / "flat"), name="flat2", clip=f"local-dir:{DEMO_CLIP}",
                    indexes=str(planted["home"]), workers=0, progress=False)
    report, _, files = api.curate("flat2", CurateOptions(k=5), out=str(tmp_path / "r"), indexes=str(planted["home"]))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(Path(files["html"]).resolve().as_uri())
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        assert len(sizes) >= 16 and all(done and width == 96 for done, width in sizes)
        groups = page.locator("#duplicates ~ .row").count()
        assert page.inner_text("#duplicates").startswith(f"Near-duplicate groups ({len(report.duplicate_groups)}")
        assert groups >= len(report.duplicate_groups) >= 10
        assert "m-photo.png" in page.inner_text("body")
        page.screenshot(path=str(REPO / "docs" / "curate-report.png"))
        browser.close()
