"""LoRA adapters through the service (the real server on 127.0.0.1): loaded once at start, switched per request
without reloading the base model, weight 0 the base bit for bit, recorded in provenance, bad choices 4xx."""

from __future__ import annotations

import json

import pytest

from rdm import RDMPipeline
from rdm.errors import RDMError
from rdm.service.config import ServeConfig
from rdm.service.server import start
from tests.helpers.servekit import build_world, call, jcall, serve_world, wait_job
from tests.helpers.world import make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    world = build_world(tmp_path_factory.mktemp("serve-adapters"), tiny_clip)
    fingerprint = RDMPipeline.from_pretrained(world["model"]).fingerprint
    world["adapters"] = [make_adapter(world["root"] / "adapters" / name, world["model"], seed, fingerprint)
                         for name, seed in (("ink", 1), ("paper", 2))]
    world["foreign"] = make_adapter(world["root"] / "adapters" / "foreign", world["model"], 3, "f" * 64)
    return world


@pytest.fixture(scope="module")
def served(world):
    running = serve_world(world, adapters=tuple(str(a) for a in world["adapters"]))
    yield running, running.pipe
    running.stop()


def png(base: str, view: dict) -> bytes:
    """The image's pixels (the PNG without its content credentials, which differ per signature)."""
    import io

    import numpy as np
    from PIL import Image

    status, _, data = call(f"{base}{view['images'][0]['image_url']}")
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()


def submit(base: str, **body) -> dict:
    status, job = jcall(f"{base}/api/generate", "POST",
                        {"prompt": "a red circle", "databases": [{"name": "A"}], "k": 2, "steps": 4, **body})
    assert status == 202, job
    return job


def run(base: str, **body) -> dict:
    view = wait_job(base, submit(base, **body))
    assert view["state"] == "done", view
    return view


def test_adapters_switch_per_request_without_reloading_the_base(served):
    running, pipe = served
    base = running.url
    unet, weights = pipe.unet, pipe.unet.conv_in.weight.data_ptr()
    status, info = jcall(f"{base}/api/info")
    assert status == 200 and [a["name"] for a in info["adapters"]] == ["ink", "paper"]
    assert all("path" not in a for a in info["adapters"]) and info["adapters"][0]["rank"] == 2

    plain = png(base, run(base))
    inked_view = run(base, adapters=[{"name": "ink", "weight": 1.0}])
    inked = png(base, inked_view)
    assert inked != plain  # the adapter changes the image
    assert png(base, run(base, adapters=[{"name": "ink", "weight": 0.0}])) == plain  # weight 0: the base, bit for bit
    assert png(base, run(base)) == plain  # switched off again: nothing left behind
    assert png(base, run(base, adapters=[{"name": "ink"}, {"name": "paper", "weight": 0}])) == inked  # (1, 0)
    mixed = png(base, run(base, adapters=[{"name": "ink", "weight": 0.5}, {"name": "paper", "weight": 0.5}]))
    assert mixed not in (plain, inked)

    # rows with and without an adapter submitted together are sampled apart, each as if alone
    jobs = [submit(base, adapters=[{"name": "ink"}]), submit(base), submit(base, adapters=[{"name": "ink"}])]
    got = [png(base, wait_job(base, j)) for j in jobs]
    assert got == [inked, plain, inked]

    record = json.loads(call(f"{base}{inked_view['images'][0]['provenance_url']}")[2])
    assert [(a["name"], a["weight"]) for a in record["model"]["adapters"]] == [("ink", 1.0)]
    assert len(record["model"]["adapters"][0]["sha256"]) == 64 and "path" not in record["model"]["adapters"][0]
    status, stats = jcall(f"{base}/api/stats", headers={"Authorization": f"Bearer {running.key}"})
    assert stats["adapter_loads"] == 2  # both read once, at start; every switch since read nothing
    assert pipe.unet is unet and pipe.unet.conv_in.weight.data_ptr() == weights  # the base model was not reloaded


def test_bad_adapter_choices_are_4xx(served):
    base = served[0].url
    cases = [([{"name": "nope"}], 404, "no adapter 'nope'"),
             ([{"name": "ink", "weight": 10}], 422, "adapters.0.weight: Input should be less than or equal to 4"),
             ([{"name": "ink"}, {"name": "ink", "weight": 0.5}], 422, "listed twice"),
             ([{"name": "ink", "scale": 1}], 422, ""),
             ("ink", 422, "")]
    for adapters, want, message in cases:
        status, body = jcall(f"{base}/api/generate", "POST", {"prompt": "a red circle", "adapters": adapters})
        assert status == want and message in json.dumps(body), (adapters, status, body)
    status, body = jcall(f"{base}/api/compare", "POST", {"prompt": "x", "rows": [[]], "adapters": [{"name": "nope"}]})
    assert status == 404, body
    assert run(base)["state"] == "done"  # still serving


def test_an_adapter_for_another_base_model_stops_the_start(world):
    pipe = RDMPipeline.from_pretrained(world["model"])
    with pytest.raises(RDMError, match="trained on model"):
        start(ServeConfig(port=0, anonymous=("*",), model=str(world["model"]), indexes=str(world["home"]),
                          adapters=(str(world["foreign"]),)), pipe=pipe)
