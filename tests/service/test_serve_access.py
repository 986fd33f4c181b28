"""Who may use the real server on 127.0.0.1: API keys (hashed at rest) with scopes and collection allow-lists,
anonymous access only where the operator opens it, jobs and uploads owned by their key, every use audited
(issue 25)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rdm.cli import main
from rdm.service.access import add_key, read_keys
from tests.helpers.imagezoo import picture_png
from tests.helpers.servekit import build_world, call, clip_client_module, jcall, multipart, serve_world, wait_job

pytestmark = pytest.mark.usefixtures("one_thread")

ROLES = {"alice": (("search", "generate", "upload"), ("A",)), "bob": (("search",), ("B",)),
         "ops": (("remove",), ("A",)), "boss": (("admin",), ())}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("serve-access")
    world = build_world(root, tiny_clip)
    keys_file = root / "keys.json"
    tokens = {name: add_key(keys_file, name, scopes, collections) for name, (scopes, collections) in ROLES.items()}
    running = serve_world(world, keys=str(keys_file), anonymous=(), audit_log=str(root / "audit.jsonl"))
    yield running, tokens, root
    running.stop()


def as_(tokens: dict, name: str) -> dict:
    return {"Authorization": f"Bearer {tokens[name]}"}


def test_keys_are_stored_hashed(served):
    _, tokens, root = served
    text = (root / "keys.json").read_text()
    for name, token in tokens.items():
        assert token not in text and token.startswith("rdm-") and len(token) > 40
    assert {k.name for k in read_keys(root / "keys.json")} == set(ROLES)
    assert (root / "keys.json").stat().st_mode & 0o077 == 0  # readable by its owner only


def test_without_a_key_nothing_but_health_and_the_contract(served):
    running, tokens, _ = served
    base = running.url
    assert jcall(f"{base}/api/health")[0] == 200 and call(f"{base}/openapi.json")[0] == 200
    for method, path, body in [("GET", "/api/info", None), ("GET", "/api/databases", None),
                               ("GET", "/api/databases/A/items?id=img001.png", None),
                               ("GET", "/api/databases/A/image?id=img001.png", None),
                               ("POST", "/api/search", {"database": "A", "text": "x"}),
                               ("POST", "/api/generate", {"prompt": "x"}), ("GET", "/indices-list", None),
                               ("POST", "/knn-service", {"text": "x", "indice_name": "A"})]:
        status, headers, data = call(f"{base}{path}", method, body)
        assert status == 401 and headers.get("www-authenticate") == "Bearer", (path, status, data)
    status, err = jcall(f"{base}/api/info", headers={"Authorization": "Bearer rdm-not-a-key"})
    assert status == 401 and "not valid" in err["error"]


def test_a_key_without_a_collection_neither_lists_nor_searches_it(served):
    running, tokens, _ = served
    base, alice = running.url, as_(tokens, "alice")
    status, dbs = jcall(f"{base}/api/databases", headers=alice)
    assert status == 200 and [d["name"] for d in dbs] == ["A"]
    assert jcall(f"{base}/indices-list", headers=alice) == (200, ["A"])
    assert jcall(f"{base}/api/search", "POST", {"database": "A", "text": "a star"}, headers=alice)[0] == 200
    hidden = [("GET", "/api/databases/B", None), ("GET", "/api/databases/B/items?id=img001.png", None),
              ("GET", "/api/databases/B/image?id=img001.png", None), ("GET", "/api/databases/B/curate", None),
              ("POST", "/api/search", {"database": "B", "text": "x"}),
              ("POST", "/api/search", {"database": "A", "image": {"database": "B", "id": "img001.png"}}),
              ("POST", "/api/generate", {"prompt": "x", "databases": [{"name": "B"}]}),
              ("POST", "/api/generate", {"prompt": "x", "databases": [{"name": "A"}],
                                         "negative_databases": [{"name": "B"}]}),
              ("POST", "/api/generate", {"init_image": {"database": "B", "id": "img001.png"}}),
              ("POST", "/api/compare", {"prompt": "x", "rows": [[{"name": "A"}], [{"name": "B"}]]}),
              ("POST", "/knn-service", {"text": "x", "indice_name": "B"}),
              ("POST", "/metadata", {"ids": ["img001.png"], "indice_name": "B"})]
    for method, path, body in hidden:
        status, err = jcall(f"{base}{path}", method, body, headers=alice)
        assert status == 404 and "B" not in json.dumps(err).replace("'B'", ""), (path, status, err)
    # the same answer as for a database that does not exist: an allow-list does not reveal what else is served
    assert jcall(f"{base}/api/databases/nope", headers=alice)[0] == 404
    # bob sees B only, and may search but not generate or upload
    bob = as_(tokens, "bob")
    assert [d["name"] for d in jcall(f"{base}/api/databases", headers=bob)[1]] == ["B"]
    status, err = jcall(f"{base}/api/generate", "POST", {"prompt": "x", "databases": [{"name": "B"}]}, headers=bob)
    assert status == 403 and "may not generate" in err["error"]
    body, headers = multipart("file", "q.png", picture_png(3))
    assert jcall(f"{base}/api/uploads", "POST", raw=body, headers={**headers, **bob})[0] == 403
    assert jcall(f"{base}/api/stats", headers=bob)[0] == 403 and jcall(f"{base}/api/stats",
                                                                         headers=as_(tokens, "boss"))[0] == 200


def test_jobs_and_uploads_belong_to_their_key(served):
    running, tokens, _ = served
    base, alice, bob, boss = running.url, as_(tokens, "alice"), as_(tokens, "bob"), as_(tokens, "boss")
    body, headers = multipart("file", "q.png", picture_png(3))
    status, up = jcall(f"{base}/api/uploads", "POST", raw=body, headers={**headers, **alice})
    assert status == 200
    assert jcall(f"{base}/api/search", "POST", {"database": "A", "image": {"upload": up["upload"]}},
                 headers=alice)[0] == 200
    # bob may search, but alice's upload is not found for him (as if it had never been made)
    bob_search = {"database": "B", "image": {"upload": up["upload"]}}
    assert jcall(f"{base}/api/search", "POST", bob_search, headers=bob)[0] == 404
    status, job = jcall(f"{base}/api/generate", "POST", {"prompt": "a red star", "databases": [{"name": "A"}],
                                                        "steps": 2}, headers=alice)
    assert status == 202
    done = wait_job(base, job, headers=alice)
    assert done["state"] == "done"
    assert call(f"{base}/api/jobs/{job['id']}/images/0.png", headers=boss)[0] == 200  # an admin sees every job
    for method, path in [("GET", f"/api/jobs/{job['id']}"), ("GET", f"/api/jobs/{job['id']}/events"),
                         ("GET", f"/api/jobs/{job['id']}/images/0.png"),
                         ("GET", f"/api/jobs/{job['id']}/provenance/0.json"),
                         ("GET", f"/api/jobs/{job['id']}/provenance.json"), ("DELETE", f"/api/jobs/{job['id']}")]:
        assert call(f"{base}{path}", method, headers=bob)[0] == 404, path
        assert call(f"{base}{path}", method, headers=alice)[0] == 200, path


def test_takedowns_need_the_remove_scope_on_the_collection_and_are_audited(served):
    running, tokens, root = served
    base = running.url
    status, err = jcall(f"{base}/api/databases/A/remove", "POST", {"ids": ["img003.png"]}, headers=as_(tokens, "alice"))
    assert status == 403 and "may not remove" in err["error"]
    assert jcall(f"{base}/api/databases/B/remove", "POST", {"ids": ["img003.png"]},
                 headers=as_(tokens, "ops"))[0] == 404  # ops may remove from A only
    status, res = jcall(f"{base}/api/databases/A/remove", "POST", {"ids": ["img003.png"]}, headers=as_(tokens, "ops"))
    assert status == 200 and res["removed"] == ["img003.png"]
    lines = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    takedowns = [e for e in lines if e["event"] == "takedown"]
    assert takedowns[-1]["by"] == "ops" and takedowns[-1]["ids"] == ["img003.png"]
    uses = {e["key"] for e in lines if e["event"] == "use"}
    assert {"alice", "bob", "ops"} <= uses and not any(t in (root / "audit.jsonl").read_text() for t in tokens.values())
    refused = [e for e in lines if e["event"] == "refused"]
    assert any(e["status"] == 401 for e in refused) and any(e["status"] == 403 and e.get("key") == "bob"
                                                            for e in refused)


def test_anonymous_access_only_to_the_collections_named(tmp_path, tiny_clip):
    world = build_world(tmp_path, tiny_clip)
    running = serve_world(world, anonymous=("B",))
    try:
        base = running.url
        assert [d["name"] for d in jcall(f"{base}/api/databases")[1]] == ["B"]
        assert jcall(f"{base}/api/search", "POST", {"database": "A", "text": "x"})[0] == 404
        client = clip_client_module().ClipClient(url=f"{base}/knn-service", indice_name="B", num_images=3,
                                                 deduplicate=False)
        assert len(client.query(text="a picture")) == 3  # clip-retrieval's client, which sends no key
        # the run's own key (rdm serve prints it in the page's link) sees everything
        admin = {"Authorization": f"Bearer {running.key}"}
        assert [d["name"] for d in jcall(f"{base}/api/databases", headers=admin)[1]] == ["A", "B"]
    finally:
        running.stop()


def test_keys_cli(tmp_path):
    keys_file = tmp_path / "k" / "keys.json"
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "add", "team", "--keys", str(keys_file), "--scope", "search",
                                "--collection", "wikiart"])
    assert made.exit_code == 0 and made.stdout.strip().startswith("rdm-")
    assert made.stdout.strip() not in keys_file.read_text()
    again = runner.invoke(main, ["keys", "add", "team", "--keys", str(keys_file)])
    assert again.exit_code == 1 and "already has a key named 'team'" in again.output
    listed = runner.invoke(main, ["keys", "list", "--keys", str(keys_file)])
    assert "team  scopes=search  collections=wikiart" in listed.output
    assert runner.invoke(main, ["keys", "remove", "team", "--keys", str(keys_file)]).exit_code == 0
    assert read_keys(keys_file) == []
    keys_file.write_text('{"keys": [{"name": "x", "sha256": "abc", "scopes": ["search"], "collections": []}]}')
    bad = runner.invoke(main, ["serve", "--keys", str(keys_file), "--model", str(tmp_path)])
    assert bad.exit_code == 1 and "64 lowercase hex" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("fair", [True, False])
def test_one_key_cannot_take_every_slot_and_keys_are_served_in_turn(tmp_path, tiny_clip, fair):
    world = build_world(tmp_path, tiny_clip)
    keys_file = tmp_path / "keys.json"
    flood, polite = (add_key(keys_file, name, ("generate",), ("*",)) for name in ("flood", "polite"))
    running = serve_world(world, keys=str(keys_file), anonymous=(), max_batch=1, max_jobs_per_key=2,
                          fair_queue=fair)
    try:
        base = running.url
        big = {"prompt": "a long one", "steps": 40, "num_images": 4}
        flooder = {"Authorization": f"Bearer {flood}"}
        first = jcall(f"{base}/api/generate", "POST", big, headers=flooder)[1]
        second = jcall(f"{base}/api/generate", "POST", big, headers=flooder)[1]
        status, err = jcall(f"{base}/api/generate", "POST", big, headers=flooder)
        assert status == 429 and "your share of the queue (2)" in err["error"]  # its share, not the whole queue
        mine = {"Authorization": f"Bearer {polite}"}
        status, job = jcall(f"{base}/api/generate", "POST", {"prompt": "a short one", "steps": 2}, headers=mine)
        assert status == 202  # another key still gets in
        assert job["position"] == 0 if fair else job["position"] >= 4  # next in turn / behind the flood's rows
        done = wait_job(base, job, headers=mine)
        views = [wait_job(base, j, headers=flooder) for j in (first, second)]
        if fair:  # served at the next turn: before the flood's first job, 4 rows long, is through
            assert done["finished"] < views[0]["finished"]
        else:  # first come, first served: after all 8 of the flood's rows
            assert done["finished"] > views[1]["finished"]
    finally:
        running.stop()


def test_a_key_added_or_removed_counts_from_the_next_request(tmp_path, tiny_clip):
    world = build_world(tmp_path, tiny_clip)
    keys_file = tmp_path / "keys.json"
    first = add_key(keys_file, "first", ("search",), ("*",))
    running = serve_world(world, keys=str(keys_file), anonymous=())
    try:
        base = running.url
        assert jcall(f"{base}/api/databases", headers={"Authorization": f"Bearer {first}"})[0] == 200
        later = CliRunner().invoke(main, ["keys", "add", "later", "--keys", str(keys_file), "--scope", "search"])
        assert jcall(f"{base}/api/databases", headers={"Authorization": f"Bearer {later.stdout.strip()}"})[0] == 200
        assert CliRunner().invoke(main, ["keys", "remove", "first", "--keys", str(keys_file)]).exit_code == 0
        status, err = jcall(f"{base}/api/databases", headers={"Authorization": f"Bearer {first}"})
        assert status == 401 and "revoked" in err["error"]
        keys_file.write_text("{ not json")  # a broken file: the keys read before stay
        assert jcall(f"{base}/api/databases", headers={"Authorization": f"Bearer {later.stdout.strip()}"})[0] == 200
    finally:
        running.stop()

