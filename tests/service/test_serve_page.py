"""The page in headless Chromium (Debian's chromium, driven by Playwright): prompt -> progress -> images with
neighbours -> compare -> provenance download, with clear errors; saves docs/serve-page.png."""

import json
from pathlib import Path

import pytest

from rdm.demo.evaluate import build_style_databases
from rdm.demo.run import DEMO_CLIP, DEMO_MODEL, DEMO_START
from rdm.models.format import model_fingerprint
from rdm.service.config import ServeConfig
from rdm.service.server import start
from tests.helpers.browser import chromium_browser
from tests.helpers.world import REPO, make_adapter

SCREENSHOT = REPO / "docs" / "serve-page.png"
STYLES = ("neon", "mosaic", "outline")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    build_style_databases(f"local-dir:{DEMO_CLIP}", root / "toyart", 12, "{style}", STYLES, str(root / "indexes"),
                          start=DEMO_START)
    adapter = make_adapter(root / "adapters" / "bold", DEMO_MODEL, 5, model_fingerprint(DEMO_MODEL))
    running = start(ServeConfig(port=0, anonymous=("*",), model=str(DEMO_MODEL), indexes=str(root / "indexes"),
                                adapters=(str(adapter),)))
    running.root = root
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    yield from chromium_browser()


def open_page(server, browser):
    """(page, list its script errors collect in) on the service's page."""
    page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True, bypass_csp=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    return page, errors


def test_prompt_progress_neighbours_compare_and_provenance(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True,
                            bypass_csp=True)  # wait_for_function evaluates strings; the page itself needs no eval
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#databases input[type=checkbox]")
    assert page.locator("#databases .db").count() == 3
    assert "demo" in page.inner_text("#model-info") or "model" in page.inner_text("#model-info")

    # an error is shown, not thrown: no prompt
    page.fill("#prompt", "")
    page.click("#generate")
    assert "type a prompt" in page.inner_text("#error")
    # ... and a refusal from the server is shown with its message
    page.fill("#prompt", "a red star")
    page.fill("#steps", "100000")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_function("document.getElementById('error').textContent.includes('steps must be')")

    # an image query is uploaded and named; a file that is not an image is refused with the decoder's reason
    fake = tmp_path / "page.png"
    fake.write_text("<!doctype html><p>not a picture</p>")
    page.set_input_files("#image-file", str(fake))
    page.wait_for_function("document.getElementById('error').textContent.includes('not-an-image')")
    picture = next((server.app.state.engine.registry.home.parent / "toyart" / "neon").rglob("*.png"))
    page.set_input_files("#image-file", str(picture))
    page.wait_for_function("document.getElementById('image-query').textContent.startsWith('image query')")
    page.click("#clear-image")

    # prompt -> progress -> images with neighbours
    page.fill("#steps", "8")
    page.fill("#num-images", "2")
    page.check("#db-0")
    page.check("#db-1")
    page.fill("#w-1", "0.5")
    page.click("#generate")
    page.wait_for_selector("#progress:not([hidden])")
    page.wait_for_function("document.getElementById('status-text').textContent.includes('%')")
    page.wait_for_selector("#results .card img.sample", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#results .card img.sample').length === 2", timeout=120_000)
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    neighbours = page.locator("#results .card").first.locator(".neighbours img")
    assert neighbours.count() == 4  # the demo model's k
    titles = [neighbours.nth(i).get_attribute("title") for i in range(4)]
    assert {t.split("/")[0] for t in titles} <= {"neon", "mosaic"}

    # provenance download
    with page.expect_download() as info:
        page.locator("#results a.provenance").first.click()
    record = json.loads(Path(info.value.path()).read_text())
    assert record["format"] == "rdm-provenance" and record["query"] == {"prompt": "a red star"}
    assert record["seed"] == 0 and {d["name"] for d in record["databases"]} == {"neon", "mosaic"}

    # compare: a row per checked collection, and one without retrieval
    page.check("#db-2")
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('#compare-view tr').length === 4", timeout=120_000)
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=180_000)
    page.wait_for_function("[...document.querySelectorAll('#compare-view img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    rows = page.locator("#compare-view tr")
    assert [rows.nth(i).locator("th").inner_text() for i in range(4)] == ["mosaic", "neon", "outline", "no database"]
    assert all(rows.nth(i).locator("img.sample").count() == 2 for i in range(4))
    assert rows.nth(3).locator(".neighbours img").count() == 0
    assert page.locator("#history li").count() == 2
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert not errors, errors
    page.close()


def test_a_negative_collection_and_the_diversity_slider(server, browser):
    """The page sends the avoided collections and the diversity slider's value; the job's provenance says so."""
    page, errors = open_page(server, browser)
    page.wait_for_selector("#databases input[type=checkbox]")
    names = [page.locator(f"#db-{i}").get_attribute("data-name") for i in range(3)]
    page.fill("#prompt", "a green heart")
    page.fill("#num-images", "1")
    for i, name in enumerate(names):  # sample from outline, avoid neon
        (page.check if name == "outline" else page.uncheck)(f"#db-{i}")
        if name == "neon":
            page.check(f"#neg-{i}")
    page.locator("#diversity").fill("0.6")
    assert page.inner_text("#diversity-value") == "0.60"
    page.click("#generate")
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=120_000)
    with page.expect_download() as info:
        page.locator("#results a.provenance").first.click()
    record = json.loads(Path(info.value.path()).read_text())
    assert {d["name"] for d in record["databases"]} == {"outline"}
    assert record["control"]["negative_databases"] == ["neon"] and record["control"]["diversity"] == 0.6
    assert all(n["database"] == "neon" for n in record["control"]["negatives"][0])
    assert not errors, errors
    page.close()


def test_an_adapter_is_chosen_with_its_weight(server, browser):
    """The page lists the served adapters; a checked one is sent with its slider's weight, and provenance says so."""
    page, errors = open_page(server, browser)
    page.wait_for_selector("#adapters input[type=checkbox]")
    assert page.is_visible("#adapters-box") and page.get_attribute("#ad-0", "data-name") == "bold"
    page.fill("#prompt", "a blue star")
    page.fill("#num-images", "1")
    page.check("#ad-0")
    page.locator("#adw-0").fill("0.5")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=120_000)
    with page.expect_download() as info:
        page.locator("#results a.provenance").first.click()
    record = json.loads(Path(info.value.path()).read_text())
    assert [(a["name"], a["weight"]) for a in record["model"]["adapters"]] == [("bold", 0.5)]
    assert not errors, errors
    page.close()


def test_a_photo_is_uploaded_a_mask_painted_and_only_the_masked_region_redrawn(server, browser, tmp_path):
    """Upload a photo, paint its right side with the mouse, run an inpainting job: the unpainted side is the
    photo's own pixels; the provenance names the upload and the mask; saves docs/serve-page-inpaint.png."""
    import io
    import urllib.request

    import numpy as np
    from PIL import Image, ImageDraw

    page, errors = open_page(server, browser)
    page.wait_for_selector("#databases input[type=checkbox]")
    photo = Image.new("RGB", (64, 64), (245, 245, 240))
    ImageDraw.Draw(photo).ellipse((8, 14, 40, 46), fill=(30, 60, 220))
    photo.save(tmp_path / "photo.png")
    page.set_input_files("#init-file", str(tmp_path / "photo.png"))
    page.wait_for_selector("#mask-box:not([hidden])")
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush", "40")
    for x in (0.8, 0.92):  # two strokes down the right fifth of the photo
        page.mouse.move(box["x"] + x * box["width"], box["y"] + 2)
        page.mouse.down()
        for y in range(2, int(box["height"]), 8):
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y)
        page.mouse.up()
    assert "inpainting" in page.inner_text("#mask-info")
    page.fill("#prompt", "a red star")
    page.locator("#strength").fill("1")
    page.fill("#num-images", "1")
    page.fill("#steps", "8")
    for i in range(3):
        (page.check if i == 0 else page.uncheck)(f"#db-{i}")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=120_000)
    url = page.locator("#results .card img.sample").first.get_attribute("src")
    with urllib.request.urlopen(url if url.startswith("http") else server.url + url, timeout=30) as r:
        got = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    original = np.asarray(photo)
    assert got.shape == original.shape
    assert np.array_equal(got[:, :36], original[:, :36])  # away from the painted side: the photo itself
    assert np.abs(got[:, 56:].astype(int) - original[:, 56:]).mean() > 3  # the painted side is redrawn
    with page.expect_download() as info:
        page.locator("#results a.provenance").first.click()
    record = json.loads(Path(info.value.path()).read_text())
    assert record["edit"]["strength"] == 1.0 and 0.1 < record["edit"]["mask"]["coverage"] < 0.5
    assert record["edit"]["init_image"]["name"].startswith("upload u-")
    page.screenshot(path=str(SCREENSHOT.with_name("serve-page-inpaint.png")), full_page=True)
    assert not errors, errors
    page.close()


def test_a_near_copy_of_a_collection_item_is_flagged_on_its_card(server, browser):
    """A collection's own picture uploaded and returned unchanged (strength 0): the copy guard names the item."""
    item = sorted((server.root / "toyart" / "neon").rglob("*.png"))[0]
    page = browser.new_page(viewport={"width": 1360, "height": 900}, bypass_csp=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#databases input[type=checkbox]")
    page.set_input_files("#init-file", str(item))
    page.wait_for_selector("#mask-box:not([hidden])")
    page.locator("#strength").fill("0")
    page.fill("#num-images", "1")
    for box in page.locator("#databases input[type=checkbox]").all():
        (box.check if box.get_attribute("data-name") == "neon" else box.uncheck)()
    page.click("#generate")
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')", timeout=120_000)
    flag = page.locator("#results .card .near-copy")
    assert flag.count() == 1 and "near-copy of neon/" in flag.inner_text() and item.name in flag.inner_text()
    assert not errors, errors
    page.close()
