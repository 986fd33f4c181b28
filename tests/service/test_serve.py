"""`rdm serve` end to end: a real server on 127.0.0.1, every endpoint, batching, trust and load rules."""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from rdm import RDMPipeline
from rdm.errors import RDMError
from rdm.service.config import ServeConfig
from rdm.service.server import check_binding, start
from tests.helpers.servekit import build_world, call, clip_client_module, jcall, multipart, wait_job

TOKEN = "t0ken-for-the-tests-0123456789"
FAST = {"steps": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    return build_world(tmp_path_factory.mktemp("serve"), tiny_clip)


@pytest.fixture(scope="module")
def pipe(world):
    p = RDMPipeline.from_pretrained(world["model"])
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def server(world, pipe):
    running = start(ServeConfig(port=0, anonymous=("*",), model=str(world["model"]), indexes=str(world["home"]), token=TOKEN,
                                max_upload_bytes=256 * 1024, max_pixels=4_000_000), pipe=pipe)
    yield running
    running.stop()


def png(size=(40, 32), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def generate(base, **body):
    status, job = jcall(f"{base}/api/generate", "POST", {**FAST, **body})
    assert status == 202, job
    return wait_job(base, job)


# --- every endpoint ---------------------------------------------------------------------------------

def test_service_info_databases_items_and_images(server, world):
    base = server.url
    assert jcall(f"{base}/api/health") == (200, {"ok": True})
    status, info = jcall(f"{base}/api/info")
    assert status == 200 and info["model"]["resolution"] == 16 and info["writes_enabled"] is False  # anonymous
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert jcall(f"{base}/api/info", headers=auth)[1]["writes_enabled"] is True  # the takedown token's key
    status, schema = jcall(f"{base}/openapi.json")
    assert status == 200 and {"/api/generate", "/api/search", "/knn-service", "/indices-list"} <= schema["paths"].keys()
    status, dbs = jcall(f"{base}/api/databases")
    assert [d["name"] for d in dbs] == ["A", "B"] and all(d["compatible"] for d in dbs)
    assert "path" not in dbs[0]["columns"] and "path" not in json.dumps(dbs[0]["sources"])  # no server paths
    status, one = jcall(f"{base}/api/databases/A")
    assert status == 200 and one["count"] == 12
    status, item = jcall(f"{base}/api/databases/A/items?id=img003.png")
    assert status == 200 and item["id"] == "img003.png" and "path" not in item
    status, headers, data = call(f"{base}/api/databases/A/image?id=img003.png&size=thumb")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-content-type-options"] == "nosniff"
    thumb = Image.open(io.BytesIO(data))
    full = Image.open(io.BytesIO(call(f"{base}/api/databases/A/image?id=img003.png&size=full")[2]))
    source = Image.open(world["root"] / "picsA" / "img003.png")
    assert full.size == source.size
    assert np.array_equal(np.asarray(full.convert("RGB")), np.asarray(source.convert("RGB")))
    assert max(thumb.size) <= 160
    status, headers, page = call(f"{base}/")
    assert status == 200 and b"/static/app.js" in page and "content-security-policy" in headers
    assert call(f"{base}/static/app.js")[0] == 200 and call(f"{base}/static/style.css")[0] == 200
    assert jcall(f"{base}/api/stats")[0] == 401  # an admin's
    assert jcall(f"{base}/api/stats", headers={"Authorization": f"Bearer {server.key}"})[0] == 200


def test_search_by_text_upload_item_and_embedding(server, world):
    base = server.url
    status, res = jcall(f"{base}/api/search", "POST", {"database": "A", "text": "a red circle", "k": 4})
    assert status == 200 and len(res["results"]) == 4 and res["query"] == {"prompt": "a red circle"}
    assert all(r["thumbnail_url"].startswith("/api/databases/A/image?id=") for r in res["results"])
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    status, res = jcall(f"{base}/api/search", "POST", {"database": "A", "image": {"database": "A", "id": "img007.png"}})
    assert status == 200 and res["results"][0]["id"] == "img007.png"  # an item's nearest neighbour is itself
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    body, headers = multipart("file", "q.png", (world["root"] / "picsA" / "img005.png").read_bytes())
    status, up = jcall(f"{base}/api/uploads", "POST", raw=body, headers=headers)
    assert status == 200 and up["upload"].startswith("u-") and (up["width"], up["height"]) == (48, 40)
    status, res = jcall(f"{base}/api/search", "POST", {"database": "A", "image": {"upload": up["upload"]}, "k": 2})
    assert status == 200 and res["results"][0]["id"] == "img005.png"
    vector = [0.0] * 32
    vector[3] = 2.0
    status, res = jcall(f"{base}/api/search", "POST", {"database": "B", "embedding": vector, "k": 3,
                                                       "where": {"id": ["img002.png", "img004.png"]}})
    assert status == 200 and sorted(r["id"] for r in res["results"]) == ["img002.png", "img004.png"]


def test_generate_job_progress_events_images_and_provenance(server, pipe):
    base = server.url
    status, job = jcall(f"{base}/api/generate", "POST",
                        {"prompt": "a red circle", "databases": [{"name": "A"}, {"name": "B", "weight": 0.5}],
                         "k": 3, "seed": 7, "num_images": 2, "steps": 4})
    assert status == 202 and job["state"] in ("queued", "running")
    with urllib.request.urlopen(f"{base}{job['events_url']}", timeout=60) as stream:
        events = [line.decode().split(": ", 1)[1].strip() for line in stream if line.startswith(b"event:")]
    assert events[-1] == "done" and "progress" in events[:-1]
    view = wait_job(base, job)
    assert view["state"] == "done" and view["progress"] == 1.0 and [im["seed"] for im in view["images"]] == [7, 8]
    first = view["images"][0]
    assert len(first["neighbours"]) == 3 and {n["database"] for n in first["neighbours"]} <= {"A", "B"}
    status, headers, data = call(f"{base}{first['image_url']}")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (16, 16)
    # the PNG carries its content credentials, read by c2pa-python itself: the neighbours, no server path
    import c2pa

    with c2pa.Reader("image/png", io.BytesIO(data)) as reader:
        assert reader.get_validation_state() in ("Valid", "Trusted")
        manifest = reader.get_active_manifest()
    assert [i["metadata"]["org.rdm.neighbour"]["id"] for i in manifest["ingredients"]] == \
        [n["id"] for n in first["neighbours"]]
    assert str(server.app.state.engine.registry.home) not in json.dumps(manifest)
    status, headers, raw = call(f"{base}{first['provenance_url']}")
    record = json.loads(raw)
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert record["format"] == "rdm-provenance" and record["query"] == {"prompt": "a red circle"}
    assert record["seed"] == 7 and record["k"] == 3 and record["scheduler"]["num_inference_steps"] == 4
    assert [(d["name"], d["k_drawn"]) for d in record["databases"]] == [("A", 2), ("B", 1)]
    assert [h["id"] for h in record["neighbours"]] == [n["id"] for n in first["neighbours"]]
    home = str(server.app.state.engine.registry.home)
    assert home not in raw.decode() and all("path" not in h for h in record["neighbours"])  # ids, never paths
    assert "name_or_path" not in record["model"] and record["model"]["fingerprint"]
    # the service's image is the pipeline's own, called directly with the same prompt, databases and seed
    direct = pipe("a red circle", databases=["A", "B:0.5"], indexes=server.app.state.engine.registry, k=3, seed=7,
                  num_inference_steps=4, output_type="np").images[0]
    served = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.abs(served - np.round(direct * 255)).max() <= 1
    assert json.loads(call(f"{base}/api/jobs/{job['id']}/provenance.json")[2])["images"][1]["provenance"]["seed"] == 8


def test_generate_from_an_image_query(server, world):
    base = server.url
    view = generate(base, image={"database": "A", "id": "img002.png"}, databases=[{"name": "A"}], k=2, seed=4)
    assert view["state"] == "done" and view["images"][0]["neighbours"][0]["id"] == "img002.png"
    record = json.loads(call(f"{base}{view['images'][0]['provenance_url']}")[2])
    assert record["query"] == {"image": "A/img002.png"} and record["neighbours"][0]["score"] == pytest.approx(1, abs=1e-4)
    body, headers = multipart("file", "q.png", (world["root"] / "picsB" / "img001.png").read_bytes())
    upload = jcall(f"{base}/api/uploads", "POST", raw=body, headers=headers)[1]["upload"]
    view = generate(base, image={"upload": upload}, databases=[{"name": "B"}], k=1)
    assert view["images"][0]["neighbours"][0]["id"] == "img001.png"
    status, err = jcall(f"{base}/api/generate", "POST", {"prompt": "x", "image": {"upload": upload}})
    assert status == 422 and "exactly one query" in err["error"]


def test_compare_rows_share_seeds_and_differ_by_database(server):
    base = server.url
    status, job = jcall(f"{base}/api/compare", "POST", {"prompt": "a blue square", "rows": [[{"name": "A"}],
                                                        [{"name": "B"}], []], "seed": 3, "num_images": 2, **FAST})
    assert status == 202
    view = wait_job(base, job)
    assert view["state"] == "done" and view["labels"] == ["A", "B", "no database"]
    by_row = {label: [im for im in view["images"] if im["row"] == label] for label in view["labels"]}
    assert all([im["seed"] for im in ims] == [3, 4] for ims in by_row.values())
    assert {n["database"] for n in by_row["A"][0]["neighbours"]} == {"A"}
    assert by_row["no database"][0]["neighbours"] == []
    pixels = {label: call(f"{base}{ims[0]['image_url']}")[2] for label, ims in by_row.items()}
    assert len(set(pixels.values())) == 3  # same seed, other database: another image


def test_concurrent_jobs_are_batched_and_match_one_at_a_time(server, world, pipe):
    base = server.url
    queue = server.app.state.queue
    before = queue.counts["batches"]
    bodies = [{"prompt": p, "databases": [{"name": db}], "seed": s, **FAST}
              for p, db, s in (("a red circle", "A", 1), ("a green star", "B", 2), ("a blue square", "A", 3))]
    status, blocker = jcall(f"{base}/api/generate", "POST", {"prompt": "busy", "steps": 150})  # other settings
    assert status == 202  # while it runs, the three jobs wait together, as under load
    jobs = [jcall(f"{base}/api/generate", "POST", b)[1] for b in bodies]
    assert queue.get(blocker["id"]).state == "running"
    views = [wait_job(base, j) for j in jobs]
    assert queue.counts["batches"] - before < 3 and max(queue.batch_sizes) >= 2
    for body, view in zip(bodies, views):
        alone = pipe(body["prompt"], databases=body["databases"][0]["name"], indexes=world["home"], seed=body["seed"],
                     num_inference_steps=3, output_type="np").images[0]
        served = np.asarray(Image.open(io.BytesIO(call(f"{base}{view['images'][0]['image_url']}")[2])), np.int16)
        assert np.abs(served - np.round(alone * 255)).max() <= 1, body


def test_cancel_a_job(server):
    base = server.url
    status, job = jcall(f"{base}/api/generate", "POST", {"prompt": "a long one", "steps": 150, "num_images": 8})
    assert status == 202
    stream = urllib.request.urlopen(f"{base}{job['events_url']}", timeout=60)
    assert stream.readline().startswith(b"event:")
    status, view = jcall(f"{base}/api/jobs/{job['id']}", "DELETE")
    assert status == 200 and view["state"] == "cancelled"
    # cancelled and forgotten: its id is unknown now, and its open event stream ends with the cancel
    assert jcall(f"{base}/api/jobs/{job['id']}")[0] == 404
    events = [line.decode().strip() for line in stream if line.startswith(b"event:")]
    assert events[-1] == "event: cancelled"


# --- clip-retrieval's client, unchanged -------------------------------------------------------------

def test_clip_retrieval_client_queries_by_text_and_image(server, world):
    cc = clip_client_module()
    assert jcall(f"{server.url}/indices-list") == (200, ["A", "B"])
    client = cc.ClipClient(url=f"{server.url}/knn-service", indice_name="A", num_images=5)
    results = client.query(text="a red circle")
    assert len(results) >= 1 and {"id", "similarity", "url"} <= results[0].keys()
    assert all(r["url"].startswith(f"{server.url}/api/databases/A/image?id=") for r in results)
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    image_results = client.query(image=str(world["root"] / "picsA" / "img009.png"))
    assert image_results[0]["id"] == "img009.png" and image_results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert call(image_results[0]["url"])[0] == 200
    no_dedup = cc.ClipClient(url=f"{server.url}/knn-service", indice_name="B", num_images=10, deduplicate=False)
    emb = no_dedup.query(embedding_input=[1.0] + [0.0] * 31)
    assert len(emb) == 10 and {r["id"] for r in emb} <= {f"img{i:03d}.png" for i in range(10)}
    status, meta = jcall(f"{server.url}/metadata", "POST", {"ids": ["img001.png", "nope"], "indice_name": "B"})
    assert status == 200 and meta[0]["metadata"]["id"] == "img001.png" and meta[1]["metadata"] is None


# --- hostile inputs: each its 4xx, and the server keeps serving ----------------------------------------

def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, format="PNG")  # 6 MP: over the test server's 4 MP limit, 20 KB on disk
    return buf.getvalue()


def test_hostile_inputs_get_4xx_and_the_server_keeps_serving(server, world):
    base = server.url
    good = {"prompt": "a red circle", "databases": [{"name": "A"}], "steps": 2}
    truncated = png()[:60]
    def knn(**kw):
        return "POST", "/knn-service", {"indice_name": "A", "modality": "image", "num_images": 3, **kw}

    cases = [
        # (method, path, JSON body or raw bytes, expected status, words in the error)
        ("POST", "/api/generate", {**good, "steps": 100000}, 422, "steps"),
        ("POST", "/api/generate", {**good, "steps": 0}, 422, "steps"),
        ("POST", "/api/generate", {**good, "k": 1000}, 422, "k must be"),
        ("POST", "/api/generate", {**good, "k": -1}, 422, "k must be"),
        ("POST", "/api/generate", {**good, "num_images": 99}, 422, "num_images"),
        ("POST", "/api/generate", {**good, "databases": [{"name": "nope"}]}, 404, "no database 'nope'"),
        ("POST", "/api/generate", {**good, "databases": [{"name": "../A"}]}, 404, "no database"),
        ("POST", "/api/generate", {**good, "prompt": "   "}, 422, "empty prompt"),
        ("POST", "/api/generate", {**good, "scheduler": "warp"}, 422, "unknown scheduler"),
        ("POST", "/api/generate", {**good, "guidance": 1e308 * 10}, 422, "finite number"),  # json.dumps -> Infinity
        ("POST", "/api/generate", {**good, "guidance": 1000.0}, 422, "guidance must be"),
        ("POST", "/api/generate", {**good, "where": {"colour": "red"}}, 404, "no column"),
        ("POST", "/api/generate", {**good, "stpes": 3}, 422, "stpes"),
        ("POST", "/api/generate", b"{\"prompt\": ", 400, "malformed JSON"),
        ("POST", "/api/generate", b"[1, 2]", 422, "invalid request"),
        ("POST", "/api/search", {"database": "A", "text": "x", "k": 100000}, 422, "k must be"),
        ("POST", "/api/search", {"database": "A", "embedding": [float("nan")] * 32}, 422, "finite number"),
        ("POST", "/api/search", {"database": "A", "embedding": [0.0] * 32}, 400, "zero vector"),
        ("POST", "/api/search", {"database": "A", "embedding": [1.0] * 7}, 400, "7 numbers"),
        ("POST", "/api/search", {"database": "A", "image": {"upload": "u-nothing"}}, 404, "no upload"),
        ("POST", "/api/search", {"database": "A", "image": {"database": "A", "id": "../../etc/passwd"}}, 404,
         "no item"),
        ("GET", "/api/databases/A/image?id=../../../../etc/passwd", None, 404, "no item"),
        ("GET", "/api/databases/A/image?id=/etc/passwd&size=full", None, 404, "no item"),
        ("GET", "/api/databases/A/image?id=%2e%2e%2fpicsA%2fimg001.png", None, 404, "no item"),
        ("GET", "/api/databases/..%2F..%2Fetc/image?id=img001.png", None, 404, "no such endpoint"),
        ("GET", "/api/databases/..%5C..%5Cetc/image?id=img001.png", None, 404, "no database"),
        ("GET", "/api/databases/A/image?id=img001.png&size=huge", None, 422, "size"),
        ("GET", "/api/jobs/..%2F..%2Fetc%2Fpasswd", None, 404, "no such endpoint"),
        ("GET", "/api/jobs/..%5Cetc", None, 404, "no job"),
        ("GET", "/api/jobs/j-0000/images/0.png", None, 404, "no job"),
        knn(embedding_input=[float("nan")] + [0.0] * 31) + (400, "not a number JSON allows"),
        knn(embedding_input=[1.0, 2.0]) + (400, "2 numbers"),
        knn(text="a red circle", num_images=10**6) + (422, "num_images"),
        knn(image="%%% not base64 %%%") + (400, "base64"),
        knn(image=base64.b64encode(b"<html><script>alert(1)</script></html>").decode()) + (400, "not-an-image"),
        knn(image=base64.b64encode(truncated).decode()) + (400, "truncated"),
        knn(image=base64.b64encode(_bomb()).decode()) + (400, "decompression-bomb"),
        knn(image=base64.b64encode(b"x" * 300_000).decode()) + (413, "larger than"),
        knn(image_url="http://127.0.0.1:1/x.png") + (403, "does not fetch URLs"),
        knn(image_url="http://example.com/x.png") + (403, "does not fetch URLs"),
        knn(text="x", modality="text") + (400, "image embeddings only"),
        knn(text="x", indice_name="nope") + (404, "no database"),
        ("POST", "/knn-service", b"not json", 400, "malformed JSON"),
        ("POST", "/knn-service", b"", 400, "empty request body"),
        ("POST", "/api/databases/A/remove", {"ids": ["img001.png"]}, 401, "remove scope"),
    ]
    for method, path, body, expected, words in cases:
        raw = body if isinstance(body, bytes) else None
        json_body = None if isinstance(body, bytes) else body
        headers = {"Content-Type": "text/plain" if path == "/knn-service" else "application/json"} if raw else None
        status, _, data = call(f"{base}{path}", method, json_body, headers=headers, raw=raw)
        message = json.loads(data).get("error", "") if data.startswith(b"{") else data.decode()
        assert status == expected and words in message, (path, body if not isinstance(body, bytes) else body[:40],
                                                           status, message)
    for name, data, status, words in (("page.png", b"<!doctype html><p>hi</p>", 400, "not-an-image"),
                                      ("t.png", truncated, 400, "truncated"), ("bomb.png", _bomb(), 400, "bomb"),
                                      ("big.png", b"\x89PNG" + b"0" * 300_000, 413, "larger than"),
                                      ("empty.png", b"", 400, "empty")):
        body, headers = multipart("file", name, data)
        got, err = jcall(f"{base}/api/uploads", "POST", raw=body, headers=headers)
        assert got == status and words in err["error"], (name, got, err)
    status, err = jcall(f"{base}/api/health", headers={"Host": "evil.example:80"})
    assert status == 403 and "not this machine" in err["error"]  # DNS rebinding
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a body announced too large: refused unread
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    # still serving, and still generating
    assert jcall(f"{base}/api/health") == (200, {"ok": True})
    assert generate(base, **good)["state"] == "done"


def test_remove_needs_the_token_and_is_honoured_at_once(server, world):
    base = server.url
    wrong = {"Authorization": "Bearer not-the-token"}
    assert jcall(f"{base}/api/databases/A/remove", "POST", {"ids": ["img010.png"]}, headers=wrong)[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, res = jcall(f"{base}/api/databases/A/remove", "POST", {"ids": ["img010.png"]}, headers=auth)
    assert status == 200 and res["removed"] == ["img010.png"] and res["count"] == 11
    assert jcall(f"{base}/api/databases/A/remove", "POST", {"ids": ["nope.png"]}, headers=auth)[0] == 404
    assert call(f"{base}/api/databases/A/image?id=img010.png")[0] == 404
    status, res = jcall(f"{base}/api/search", "POST", {"database": "A", "image": {"database": "A", "id": "img010.png"}})
    assert status == 404


def test_a_takedown_by_another_process_is_honoured_by_the_next_search(server, world):
    base = server.url
    client = clip_client_module().ClipClient(url=f"{base}/knn-service", indice_name="B", num_images=10,
                                             deduplicate=False)
    target = world["root"] / "picsB" / "img006.png"
    assert client.query(image=str(target))[0]["id"] == "img006.png"
    done = subprocess.run([sys.executable, "-m", "rdm.cli", "--indexes", str(world["home"]), "remove", "--db", "B",
                           "img006.png"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "img006.png" not in {r["id"] for r in client.query(image=str(target))}
    assert jcall(f"{base}/api/databases/B")[1]["count"] == 9
    status, view = jcall(f"{base}/api/generate", "POST", {"prompt": "x", "databases": [{"name": "B"}], "k": 9, **FAST})
    assert status == 202 and "img006.png" not in {n["id"] for n in wait_job(base, view)["images"][0]["neighbours"]}


# --- trust and load rules on their own servers ------------------------------------------------------

def test_full_queue_answers_429_with_retry_after_and_loses_no_job(world, pipe):
    running = start(ServeConfig(port=0, anonymous=("*",), indexes=str(world["home"]), max_queue=2, max_batch=1), pipe=pipe)
    try:
        base, accepted, refused = running.url, [], []
        for seed in range(5):
            status, headers, data = call(f"{base}/api/generate", "POST", {"prompt": "x", "seed": seed, "steps": 40})
            (accepted if status == 202 else refused).append((status, headers, json.loads(data)))
        assert len(accepted) == 2 and all(s == 429 for s, _, _ in refused) and refused
        assert int(refused[0][1]["retry-after"]) >= 1 and "queue is full" in refused[0][2]["error"]
        assert all(wait_job(base, job)["state"] == "done" for _, _, job in accepted)
        assert call(f"{base}/api/generate", "POST", {"prompt": "x", "steps": 2})[0] == 202  # room again
    finally:
        running.stop()


def test_shutdown_reports_jobs_in_flight_failed_and_abandoned_jobs_stop(world, pipe):
    running = start(ServeConfig(port=0, anonymous=("*",), indexes=str(world["home"]), abandon_after_s=0.5, max_batch=1), pipe=pipe)
    base, queue = running.url, running.app.state.queue
    status, abandoned = jcall(f"{base}/api/generate", "POST", {"prompt": "x", "steps": 150, "num_images": 8})
    deadline = time.monotonic() + 30
    while queue.get(abandoned["id"], touch=False).state not in ("cancelled", "done") and time.monotonic() < deadline:
        time.sleep(0.1)  # nobody polls it
    job = queue.get(abandoned["id"], touch=False)
    assert job.state == "cancelled" and "abandoned" in job.error
    events = []
    status, long_job = jcall(f"{base}/api/generate", "POST", {"prompt": "y", "steps": 150, "num_images": 8})
    reader = threading.Thread(target=lambda: events.extend(
        line.decode().strip() for line in urllib.request.urlopen(f"{base}{long_job['events_url']}", timeout=60)
        if line.startswith(b"event:")))
    reader.start()
    deadline = time.monotonic() + 60  # stop while the job runs and its event stream is open (not after a fixed sleep)
    while not (queue.get(long_job["id"], touch=False).state == "running" and events) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue.get(long_job["id"], touch=False).state == "running" and events, events
    report = dict(running.stop())
    reader.join(30)
    assert report[long_job["id"]] == "failed" and "shut down" in queue.get(long_job["id"], touch=False).error
    assert events[-1] == "event: failed"


def test_urls_are_fetched_only_when_allowed_and_never_from_local_addresses(world, pipe):
    running = start(ServeConfig(port=0, anonymous=("*",), indexes=str(world["home"]), allow_urls=True), pipe=pipe)
    try:
        for url in (f"{running.url}/api/databases/A/image?id=img001.png", "http://localhost/x.png",
                    "http://10.0.0.1/x.png", "http://[::1]/x.png", "http://169.254.169.254/latest"):
            status, err = jcall(f"{running.url}/knn-service", "POST", {"image_url": url, "indice_name": "A",
                                                                       "modality": "image", "num_images": 2})
            assert status == 403 and "non-public address" in err["error"], (url, status, err)
        status, err = jcall(f"{running.url}/knn-service", "POST", {"image_url": "file:///etc/passwd",
                                                                   "modality": "image", "num_images": 2})
        assert status == 400 and "http or https" in err["error"]
    finally:
        running.stop()


def test_binding_beyond_loopback_needs_the_network_flag():
    with pytest.raises(RDMError, match="--allow-network"):
        check_binding(ServeConfig(host="0.0.0.0"))
    check_binding(ServeConfig(host="0.0.0.0", allow_network=True))
    check_binding(ServeConfig(host="127.0.0.1"))


def test_a_takedown_needs_a_valid_key(world, pipe):
    running = start(ServeConfig(port=0, anonymous=("*",), indexes=str(world["home"])), pipe=pipe)
    try:
        status, err = jcall(f"{running.url}/api/databases/A/remove", "POST", {"ids": ["img001.png"]},
                            headers={"Authorization": "Bearer anything"})
        assert status == 401 and "not valid" in err["error"]
        status, err = jcall(f"{running.url}/api/databases/A/remove", "POST", {"ids": ["img001.png"]})
        assert status == 401 and "remove scope" in err["error"]  # anonymous callers never remove
    finally:
        running.stop()


# --- the command ------------------------------------------------------------------------------------

def test_rdm_serve_command_serves_and_reports_jobs_in_flight_at_sigterm(world, tmp_path):
    import os
    import signal

    from click.testing import CliRunner

    from rdm.cli import main

    refused = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--model", str(world["model"])])
    assert refused.exit_code == 1 and "--allow-network" in refused.output and "Traceback" not in refused.output
    (tmp_path / "short").write_text("abc\n")
    refused = CliRunner().invoke(main, ["serve", "--token-file", str(tmp_path / "short")])
    assert refused.exit_code == 1 and "at least 16" in refused.output

    (tmp_path / "token").write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rdm.cli", "--indexes", str(world["home"]), "serve", "--port",
                             str(port), "--model", str(world["model"]), "--token-file", str(tmp_path / "token"),
                             "--threads", "1"], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if jcall(f"{base}/api/health", timeout=2)[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "rdm serve did not start"
                time.sleep(0.2)
        # without a keys file the service made a key for this run and printed its page's link with it
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/#key=rdm-" in line, line
        auth = {"Authorization": "Bearer " + line.split("#key=")[1].split()[0]}
        assert jcall(f"{base}/api/info")[0] == 401  # and nothing else gets in: no anonymous access by default
        assert jcall(f"{base}/api/info", headers=auth)[1]["writes_enabled"] is True
        status, job = jcall(f"{base}/api/generate", "POST", {"prompt": "x", "steps": 150, "num_images": 8},
                            headers=auth)
        assert status == 202
        stream = urllib.request.urlopen(urllib.request.Request(f"{base}{job['events_url']}", headers=auth),
                                        timeout=60)
        assert stream.readline().startswith(b"event:")
        proc.send_signal(signal.SIGTERM)
        events = [line.decode().strip() for line in stream if line.startswith(b"event:")]
        assert events and events[-1] == "event: failed"
        assert proc.wait(60) == 0
        log = proc.stderr.read()
        assert f"job {job['id']}: failed (in flight at shutdown)" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_neighbour_control_is_served_as_the_pipeline_samples_it(server, pipe):
    from rdm.sampling.conditioning import NeighbourControl
    from rdm.sampling.selection import Selection

    base = server.url
    body = {"prompt": "a red circle", "databases": [{"name": "A"}], "k": 3, "seed": 5, "steps": 3, "diversity": 0.6,
            "max_per": {"id": 1}, "neighbour_weights": "score", "negative_databases": [{"name": "B"}],
            "negative_prompt": "a blue square", "content_subtract": 0.5, "neighbour_window": [0.0, 0.7]}
    view = generate(base, **body)
    assert view["state"] == "done", view
    record = json.loads(call(f"{base}{view['images'][0]['provenance_url']}")[2])
    control = record["control"]
    assert control["diversity"] == 0.6 and control["dedup"] == 0.95 and control["negative_databases"] == ["B"]
    assert control["window"] == [0.0, 0.7] and all("weight" in h for h in record["neighbours"])
    registry = server.app.state.engine.registry
    direct = pipe("a red circle", databases="A", indexes=registry, k=3, seed=5, num_inference_steps=3, output_type="np",
                  control=NeighbourControl(selection=Selection(diversity=0.6, max_per={"id": 1}), weighting="score",
                                           negative_databases="B", negative_prompt="a blue square",
                                           content_subtract=0.5, window=(0.0, 0.7)))
    assert [h["id"] for h in direct.provenance[0].neighbours] == [h["id"] for h in record["neighbours"]]
    served = np.asarray(Image.open(io.BytesIO(call(f"{base}{view['images'][0]['image_url']}")[2])).convert("RGB"),
                        np.int16)
    assert np.abs(served - np.round(direct.images[0] * 255)).max() <= 1
    for bad, status in (({"diversity": 2}, 422), ({"negative_databases": [{"name": "nope"}]}, 404),
                        ({"neighbour_window": [0.8, 1.2]}, 422), ({"neighbour_weights": "loud"}, 422),
                        ({"max_per": {"id": 0}}, 422), ({"content_subtract": -1}, 422)):
        status_got, answer = jcall(f"{base}/api/generate", "POST", {**body, **bad})
        assert status_got == status, (bad, answer)
    assert jcall(f"{base}/api/health")[0] == 200
