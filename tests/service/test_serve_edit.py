"""Editing through the service: an uploaded photo restyled, inpainted under an uploaded mask, compared across
collections; bad uploads and masks get 4xx and the service keeps serving (the real server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rdm import RDMPipeline
from rdm.service.config import ServeConfig
from rdm.service.server import start
from tests.helpers.servekit import build_world, call, jcall, wait_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip):
    world = build_world(tmp_path_factory.mktemp("serve-edit"), tiny_clip)
    pipe = RDMPipeline.from_pretrained(world["model"])
    pipe.set_progress_bar_config(disable=True)
    running = start(ServeConfig(port=0, anonymous=("*",), model=str(world["model"]), indexes=str(world["home"]),
                                max_upload_bytes=256 * 1024, max_pixels=4_000_000), pipe=pipe)
    yield running
    running.stop()


def encoded(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo() -> Image.Image:
    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    ImageDraw.Draw(im).ellipse((3, 3, 12, 12), fill=(20, 40, 220))
    return im


def upload(base: str, data: bytes, name: str = "p.png") -> tuple[int, dict]:
    boundary = "rdmeditboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return jcall(f"{base}/api/uploads", "POST", raw=body,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def run(base: str, path: str = "/api/generate", **body) -> dict:
    status, job = jcall(f"{base}{path}", "POST", {"steps": 4, **body})
    assert status == 202, job
    return wait_job(base, job)


def image_of(base: str, view: dict, i: int = 0) -> np.ndarray:
    status, _, data = call(f"{base}{view['images'][i]['image_url']}")
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_uploaded_photo_is_restyled_inpainted_and_compared(server):
    base = server.url
    data = encoded(photo())
    status, up = upload(base, data)
    assert status == 200
    # image-to-image, the upload as the query: strength 0 returns it
    view = run(base, init_image={"upload": up["upload"]}, strength=0.0, databases=[{"name": "A"}], k=2)
    assert view["state"] == "done", view
    assert np.array_equal(image_of(base, view), np.asarray(photo()))
    record = json.loads(call(f"{base}{view['images'][0]['provenance_url']}")[2])
    assert record["edit"]["init_image"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["edit"]["strength"] == 0.0 and record["edit"]["query_from"] == "init_image"

    # inpainting under an uploaded mask (white = redraw), with a prompt as the query
    mask = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(mask).rectangle((0, 8, 15, 15), fill=255)
    status, up_mask = upload(base, encoded(mask.convert("RGB")), "m.png")
    assert status == 200
    view = run(base, prompt="a red circle", init_image={"upload": up["upload"]}, mask={"upload": up_mask["upload"]},
               strength=1.0, databases=[{"name": "A"}], k=2, num_images=2)
    assert view["state"] == "done", view
    for i in range(2):
        got = image_of(base, view, i)
        assert np.array_equal(got[:8], np.asarray(photo())[:8])  # above the mask: the upload's own pixels
        assert not np.array_equal(got[8:], np.asarray(photo())[8:])
    record = json.loads(call(f"{base}{view['images'][0]['provenance_url']}")[2])
    assert record["edit"]["mask"]["coverage"] == 0.5 and record["edit"]["query_from"] == "prompt"

    # the same photo restyled by each collection
    view = run(base, "/api/compare", init_image={"upload": up["upload"]}, strength=0.75,
               rows=[[{"name": "A"}], [{"name": "B"}], []], k=2)
    assert view["state"] == "done" and len(view["images"]) == 3, view


def test_bad_uploads_and_masks_get_4xx_and_the_service_keeps_serving(server):
    base = server.url
    assert upload(base, b"not an image at all")[0] == 400
    assert upload(base, b"")[0] in (400, 422)
    status, up = upload(base, encoded(photo()))
    empty = upload(base, encoded(Image.new("RGB", (16, 16), 0)), "empty.png")[1]["upload"]
    cases = [
        ({"init_image": {"upload": up["upload"]}, "strength": 1.5}, 422, "strength: Input should be less than or equal to 1"),
        ({"init_image": {"upload": up["upload"]}, "mask": {"upload": empty}}, 422, "the mask is empty"),
        ({"init_image": {"upload": "u-nothing"}}, 404, "no upload"),
        ({"init_image": {"upload": up["upload"]}, "mask": {"upload": "u-nothing"}}, 404, "mask: no upload"),
        ({"prompt": "x", "strength": 0.5}, 422, "give init_image"),
        ({"init_image": {"upload": up["upload"]}, "extend": [1, 2]}, 422, "extend: List should have at least 4"),
        ({"init_image": {"upload": up["upload"]}, "aspect": "wide"}, 422, "aspect: String should match pattern"),
        ({"init_image": {"upload": up["upload"]}, "strength": "lots"}, 422, "strength"),
    ]
    for body, want, message in cases:
        status, err = jcall(f"{base}/api/generate", "POST", {"steps": 2, **body})
        assert status == want and message in err["error"], (body, status, err)
    view = run(base, prompt="a red circle", databases=[{"name": "A"}], k=2)
    assert view["state"] == "done"
