"""The service's OpenAPI contract, checked by schemathesis (every check, a bounded run) against the real server on
127.0.0.1 with a key; /docs working in Chromium under the service's own CSP; the page used with a key from the
link rdm serve prints, or typed in (issue 25)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.browser import chromium_browser
from tests.helpers.servekit import build_world, jcall, serve_world

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("RDM_CONTRACT_EXAMPLES", "6"))  # per operation; a longer run: RDM_CONTRACT_EXAMPLES=100
SEED = os.environ.get("RDM_CONTRACT_SEED", "20261206")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip):
    running = serve_world(build_world(tmp_path_factory.mktemp("serve-contract"), tiny_clip), anonymous=())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    yield from chromium_browser()


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG), "run",
               f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {server.key}", "--checks", "all",
               "--max-examples", str(EXAMPLES), "--seed", SEED, "--workers", "1", "--request-timeout", "30",
               "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = done.stdout[-6000:]
    assert done.returncode == 0, summary  # schemathesis exits 1 on any failure, 5xx or conformance
    _, schema = jcall(f"{server.url}/openapi.json")
    operations = sum(len(ops) for ops in schema["paths"].values())
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested and int(tested.group(1)) == operations, summary  # every operation was exercised
    assert re.search(r"Test cases:\s+(\d+) generated", summary) and "found" not in summary.split("Test cases:")[1]
    print(summary[-1500:])


def test_the_schema_documents_every_refusal_and_the_limits(server):
    status, schema = jcall(f"{server.url}/openapi.json")
    assert status == 200
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert {"400", "401", "403", "404", "413", "422", "429"} <= op["responses"].keys(), (method, path)
    comps = schema["components"]["schemas"]
    config = server.app.state.config
    assert comps["GenerateRequest"]["properties"]["num_images"]["maximum"] == config.max_images
    assert comps["CompareRequest"]["properties"]["rows"]["maxItems"] == config.max_compare_rows
    dim = server.app.state.engine.dim
    assert comps["SearchRequest"]["properties"]["embedding"]["anyOf"][0]["minItems"] == dim
    assert "allOf" in comps["GenerateRequest"] and "oneOf" in comps["ItemRef"]  # the rules between fields


def test_docs_work_under_the_csp_with_local_assets(server, browser):
    page = browser.new_page()  # the CSP enforced (no bypass): a script from a CDN, or inline, would be refused
    refused, requests = [], []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    status, schema = jcall(f"{server.url}/openapi.json")
    operations = sum(len(ops) for ops in schema["paths"].values())
    assert page.locator(".opblock").count() == operations
    assert not refused, refused
    assert all(u.startswith(server.url) for u in requests), [u for u in requests if not u.startswith(server.url)]
    page.close()


def test_the_page_takes_its_key_from_the_link_or_a_typed_one(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#login:not([hidden])")  # no key: the page asks for one
    assert "key" in page.inner_text("#error")
    page.fill("#key", server.key)
    page.click("#login button")
    page.wait_for_selector("#databases input[type=checkbox]")
    assert "key session" in page.inner_text("#model-info")
    cookie = [c for c in context.cookies() if c["name"] == "rdm_key"][0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    context.close()

    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.goto(f"{server.url}/#key={server.key}")  # the link rdm serve prints, opened over the page: a fragment change
    page.wait_for_selector("#databases input[type=checkbox]")
    assert page.evaluate("location.hash") == ""  # not left in the address bar or the history
    assert page.locator("#databases .db").count() == 2
    context.close()
