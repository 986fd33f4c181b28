"""The page's curation view: rdm curate on a served database through the API (ids and thumbnails, no paths, bounded)
and in headless Chromium (the planted copies side by side with what they copy, the off-style items with their
nearest members, the style card; saves docs/serve-page-curate.png)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rdm import api
from rdm.demo.run import DEMO_CLIP, DEMO_MODEL
from rdm.service.config import ServeConfig
from rdm.service.server import start
from tests.helpers.browser import ARGS, CHROMIUM
from tests.helpers.servekit import call, jcall
from tests.helpers.world import REPO, planted_toyart

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate-page")
    copies, off = planted_toyart(root / "flat")
    api.build_index(str(root / "flat"), name="flat", clip=f"local-dir:{DEMO_CLIP}", indexes=str(root / "indexes"),
                    workers=0, progress=False)
    running = start(ServeConfig(port=0, anonymous=("*",), model=str(DEMO_MODEL), indexes=str(root / "indexes"), curate_max_items=100))
    running.copies, running.off = copies, off
    yield running
    running.stop()


def test_the_api_reports_groups_outliers_and_the_style_card_by_id(server):
    status, r = jcall(f"{server.url}/api/databases/flat/curate?k=5")
    assert status == 200, r
    assert r["count"] == 65 and r["k"] == 5 and 0 < r["coherence"]["centroid_similarity"] < 1
    found = {frozenset((g["keep"]["id"], d["id"])) for g in r["duplicate_groups"] for d in g["drop"]}
    planted = {frozenset(pair) for pair in server.copies.items()}
    assert len(found & planted) >= 0.9 * len(planted) and r["duplicate_count"] == sum(len(g["drop"]) for g in
                                                                                       r["duplicate_groups"])
    flagged = {o["item"]["id"] for o in r["outliers"]}
    assert len(flagged & set(server.off)) >= 0.9 * len(server.off) and r["outlier_count"] == len(r["outliers"])
    assert all(len(o["nearest"]) == 3 for o in r["outliers"]) and len(r["representatives"]) == 16
    assert "/work/" not in json.dumps(r) and "path" not in json.dumps(r)  # ids and URLs, never server paths
    status, headers, png = call(server.url + r["representatives"][0]["thumbnail_url"])
    assert status == 200 and headers["content-type"] == "image/png" and png[:4] == b"\x89PNG"


def test_bad_requests_are_4xx(server):
    assert jcall(f"{server.url}/api/databases/nope/curate")[0] == 404
    assert jcall(f"{server.url}/api/databases/flat/curate?k=0")[0] == 422
    assert jcall(f"{server.url}/api/databases/flat/curate?representatives=1000")[0] == 422
    server.app.state.config = server.app.state.config  # the limit is the served config's
    status, r = jcall(f"{server.url}/api/databases/flat/curate?k=6")
    assert status == 200
    small = start(ServeConfig(port=0, anonymous=("*",), model=str(DEMO_MODEL), indexes=server.app.state.config.indexes,
                              curate_max_items=10), pipe=server.app.state.engine.pipe)
    try:
        status, r = jcall(f"{small.url}/api/databases/flat/curate")
        assert status == 413 and "rdm curate flat --out" in r["error"]
    finally:
        small.stop()


def test_the_page_shows_the_curation_of_a_collection(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1100}, bypass_csp=True)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector("#curate-db option[value=flat]", state="attached")
        page.select_option("#curate-db", "flat")
        page.click("#curate")
        page.wait_for_selector("#curate-card")
        assert page.inner_text("#curate-duplicates").startswith("Near-duplicate groups (")
        groups = page.locator("#curate-view .group")
        assert groups.count() >= 10 and "kept" in groups.first.inner_text()
        assert page.locator("#curate-view .outlier").count() >= 4
        assert "m-photo.png" in page.inner_text("#curate-view")
        page.wait_for_function("() => [...document.querySelectorAll('#curate-view img')].every(i => i.complete)")
        sizes = page.eval_on_selector_all("#curate-view img", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) >= 16 + 20 and all(w > 0 for w in sizes)  # every thumbnail decoded
        page.locator("#curate-view").screenshot(path=str(REPO / "docs" / "serve-page-curate.png"))
        assert not errors, errors
        browser.close()
