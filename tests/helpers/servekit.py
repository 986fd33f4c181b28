"""Shared pieces of the `rdm serve` tests: a tiny model, two databases, a running server, HTTP helpers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from rdm import api
from rdm.models.tiny import make_tiny_rdm
from tests.helpers.world import make_folder


def build_world(root: Path, clip: str) -> dict:
    """A tiny model and databases A (12 pictures) and B (10 others) in root/indexes, embedded by `clip`."""
    identity = api.load_embedder(clip, "cpu", "float32").identity.to_dict()
    model = make_tiny_rdm(root / "model", identity)
    home = root / "indexes"
    for name, n, seed in (("A", 12, 100), ("B", 10, 500)):
        make_folder(root / f"pics{name}", n, seed=seed)
        api.build_index(str(root / f"pics{name}"), name=name, clip=clip, indexes=str(home), workers=0, progress=False)
    return {"root": root, "model": model, "home": home, "clip": clip}


def call(url: str, method: str = "GET", body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, headers, body bytes) of one HTTP request; never raises on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    """A multipart/form-data body holding one file, and its Content-Type header."""
    boundary = "rdmtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def jcall(url: str, method: str = "GET", body=None, **kw) -> tuple[int, object]:
    status, _, data = call(url, method, body, **kw)
    return status, json.loads(data) if data else None


def wait_job(base: str, job: dict, timeout: float = 120, headers: dict | None = None) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, view = jcall(f"{base}/api/jobs/{job['id']}", headers=headers)
        assert status == 200, view
        if view["state"] in ("done", "failed", "cancelled"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job['id']} did not finish")


def serve_world(world: dict, **config):
    """The real server on 127.0.0.1 (any free port) around the world's tiny model and databases; stop() it.
    Open to anonymous callers on every collection unless `anonymous` says otherwise."""
    from rdm import RDMPipeline
    from rdm.service.config import ServeConfig
    from rdm.service.server import start

    pipe = RDMPipeline.from_pretrained(world["model"])
    pipe.set_progress_bar_config(disable=True)
    config.setdefault("anonymous", ("*",))  # these tests are about other things; tests/service/test_serve_access.py
    running = start(ServeConfig(port=0, model=str(world["model"]), indexes=str(world["home"]), **config), pipe=pipe)
    running.pipe = pipe
    return running


def clip_client_module():
    """clip_retrieval/clip_client.py as installed, loaded alone: the package __init__ imports its whole server stack."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        raise AssertionError("clip-retrieval is not installed (.ci/run installs it with pip install --no-deps clip-retrieval)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
