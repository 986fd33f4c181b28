"""`rdm pull` against a real HTTP server on 127.0.0.1: resumed, verified, installed, then sampled from.

The server serves the golden CompVis checkpoint as the model and a zip of CompVis-format .npz
databases; it answers Range requests, and can drop a connection half-way through a file.
"""

import hashlib
import io
import json
import threading
import time
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rdm.cli import main
from rdm.embed.embedder import EmbedderIdentity, identity_only
from rdm.models import assets as registry
from rdm.models import download
from rdm.models.download import DownloadError, fetch
from tests.helpers.world import GOLDEN, need

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 32  # the golden model's context_dim, and the tiny CLIP's embedding size


class Files:
    """What the server serves, how it misbehaves, and what it was asked."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}  # path -> send this many bytes of the next response, then hang up
        self.stall: dict[str, int] = {}  # path -> never send a byte past this offset (until removed)
        self.ranges = False  # True: honour Range requests (default off to test servers that ignore them)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.modified = time.time() - 3600
        self.base = ""  # http://127.0.0.1:PORT, set when the server starts


def make_handler(files: Files):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            files.requests.append((self.path, self.headers.get("Range")))
            body = files.data.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            wanted = self.headers.get("Range")
            stamp = formatdate(files.modified, usegmt=True)
            if wanted and files.ranges and self.headers.get("If-Range", stamp) == stamp:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("Last-Modified", stamp)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            end = len(body)
            if self.path in files.drop_once:
                end = start + files.drop_once.pop(self.path)
            if self.path in files.stall:
                end = min(end, files.stall[self.path])
            self.wfile.write(body[start:max(start, end)])
            self.wfile.flush()
            if end < len(body):
                self.close_connection = True  # hang up mid-file: the client sees a short body

    return Handler


@pytest.fixture(scope="module")
def server():
    files = Files()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(files))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    files.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield files
    httpd.shutdown()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)


def npz_bytes(n: int, seed: int, dim: int = DIM) -> bytes:
    """A CompVis retrieval database: embedding (N, D) float32, img_id (N,), patch_coords (N, 4)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, embedding=rng.standard_normal((n, dim)).astype(np.float32),
             img_id=np.array([f"{seed}-{i:04d}" for i in range(n)]), patch_coords=np.tile([0, 0, 224, 224], (n, 1)))
    return buf.getvalue()


def artbench_zip(dim: int = DIM) -> bytes:
    """Two of the ten styles, one of them split into two files (as large CompVis databases are)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("artbench-baroque/baroque_embeddings.npz", npz_bytes(12, 1, dim))
        zf.writestr("artbench-ukiyo_e/part-0.npz", npz_bytes(5, 2, dim))
        zf.writestr("artbench-ukiyo_e/part-1.npz", npz_bytes(7, 3, dim))
        zf.writestr("README.txt", "not a database")
    return buf.getvalue()


def rdm(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def rdm_env(tmp_path_factory):
    """$RDM_HOME and $RDM_INDEXES in a temporary folder for the module (no mirror variables)."""
    root = tmp_path_factory.mktemp("pull")
    mp = pytest.MonkeyPatch()
    mp.setenv("RDM_HOME", str(root / "home"))
    mp.setenv("RDM_INDEXES", str(root / "indexes"))
    for var in ("RDM_MODEL", registry.MIRROR_ENV, "RDM_PULL_URL_COMPVIS_RDM768", "RDM_PULL_URL_ARTBENCH"):
        mp.delenv(var, raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def pulled_databases(server, rdm_env, tiny_clip):
    """artbench pulled from the test's server: two npz files, one database each style."""
    server.data["/rdm/artbench_databases.zip"] = artbench_zip()
    databases = rdm("pull", "artbench", "--url", f"{server.base}/rdm/artbench_databases.zip", "--clip", tiny_clip,
                    "--quiet")
    return {"databases": databases.output, "clip": tiny_clip}


@pytest.fixture(scope="module")
def pulled(server, rdm_env, tiny_clip, pulled_databases):
    """The golden CompVis checkpoint pulled as compvis-rdm768 (dropped half-way once), beside artbench."""
    ckpt = need(GOLDEN / "model.ckpt").read_bytes()
    server.ranges = True
    server.data["/rdm/model.ckpt"] = ckpt
    server.drop_once["/rdm/model.ckpt"] = len(ckpt) // 2
    model = rdm("pull", "compvis-rdm768", "--url", f"{server.base}/rdm/model.ckpt", "--config", GOLDEN / "config.yaml",
                "--clip", tiny_clip, "--quiet")
    return {"ckpt": ckpt, "model": model.output, "databases": pulled_databases["databases"],
            "model_dir": rdm_env / "home" / "models" / "compvis-rdm768", "clip": tiny_clip}


@pytest.mark.parity  # pulls and converts the CompVis checkpoint
def test_model_download_resumes_after_a_dropped_connection_and_converts(pulled, server, rdm_env):
    half = len(pulled["ckpt"]) // 2
    asked = [r for p, r in server.requests if p == "/rdm/model.ckpt"]
    assert len(asked) == 2 and asked[0] is None and asked[1].startswith("bytes=")  # the file, then a range of it
    assert 0 < int(asked[1].removeprefix("bytes=").rstrip("-")) <= half  # from what had arrived, not from 0
    config = json.loads((pulled["model_dir"] / "rdm_config.json").read_text())
    digest = hashlib.sha256(pulled["ckpt"]).hexdigest()
    assert config["source"]["checkpoint_sha256"] == digest  # the resumed file is the served file, byte for byte
    assert config["source"]["url"] == f"{server.base}/rdm/model.ckpt" and config["source"]["asset"] == "compvis-rdm768"
    assert config["embedder"]["model"] == pulled["clip"] and config["embedder"]["weights_sha256"]
    book = json.loads((rdm_env / "home" / "digests.json").read_text())
    assert book["compvis-rdm768/model.ckpt"]["sha256"] == digest
    assert f"sha256 {digest}: first download: recorded" in pulled["model"] and "trust on first use" in pulled["model"]
    assert not list((rdm_env / "home" / "downloads").rglob("*.ckpt*"))  # no .part left, checkpoint not kept


@pytest.mark.parity  # pulls and converts the CompVis checkpoint
def test_a_copy_whose_digest_differs_is_refused(pulled, server, rdm_env):
    tampered = bytearray(pulled["ckpt"])
    tampered[len(tampered) // 3] ^= 0xFF
    server.data["/mirror/model.ckpt"] = bytes(tampered)
    before = (pulled["model_dir"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    result = rdm("pull", "compvis-rdm768", "--url", f"{server.base}/mirror/model.ckpt", "--config",
                 GOLDEN / "config.yaml", "--clip", pulled["clip"], "--force", "--quiet", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "refusing" in result.output and "recorded at its first download" in result.output
    assert f"--sha256 {hashlib.sha256(tampered).hexdigest()}" in result.output  # how to accept it on purpose
    assert not list((rdm_env / "home" / "downloads").rglob("model.ckpt*"))  # nothing of it is kept
    assert (pulled["model_dir"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


@pytest.mark.parity  # pulls and converts the CompVis checkpoint
def test_a_second_pull_is_a_no_op_and_a_matching_mirror_is_accepted(pulled, server, monkeypatch):
    assert "already installed" in rdm("pull", "compvis-rdm768", "--quiet").output
    server.data["/other/model.ckpt"] = pulled["ckpt"]
    monkeypatch.setenv(registry.MIRROR_ENV, f"{server.base}/other")
    result = rdm("pull", "compvis-rdm768", "--config", GOLDEN / "config.yaml", "--clip", pulled["clip"], "--force",
                 "--quiet")
    assert f"fetching {server.base}/other/model.ckpt" in result.output
    assert "matches the digest recorded at its first download" in result.output


def test_artbench_databases_are_built_from_the_npz_files(pulled_databases, rdm_env):
    pulled = pulled_databases
    from rdm.db.database import Database

    assert "database artbench-baroque: 12 items" in pulled["databases"]
    assert "database artbench-ukiyo_e: 12 items" in pulled["databases"]  # two files, one database
    assert "warning: the archive holds no artbench-art_nouveau" in pulled["databases"]
    db = Database.open("artbench-ukiyo_e")
    assert db.count == 12 and db.identity.model == pulled["clip"]
    ids = sorted(db.ids)
    assert ids[:5] == [f"2-{i:04d}" for i in range(5)] and ids[5:] == [f"3-{i:04d}" for i in range(7)]


@pytest.mark.parity  # pulls and converts the CompVis checkpoint
def test_sample_without_model_uses_the_pulled_model_for_the_database(pulled, rdm_env, tmp_path):
    out = tmp_path / "out"
    result = rdm("sample", "a lighthouse at dusk", "--db", "artbench-baroque", "--steps", "2", "--height", "64",
                 "--width", "64", "--quiet", "--out", out)
    record = json.loads(next(out.glob("a-lighthouse-at-dusk-0.json")).read_text())
    assert Path(record["model"]["name_or_path"]) == pulled["model_dir"].resolve()
    assert {h["database"] for h in record["neighbours"]} == {"artbench-baroque"} and len(record["neighbours"]) == 4
    assert "grid:" in result.output


def test_no_installed_model_for_the_database_says_what_to_do(pulled_databases, rdm_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RDM_HOME", str(tmp_path / "empty-home"))
    result = rdm("sample", "a lighthouse", "--db", "artbench-baroque", "--quiet", "--out", tmp_path, ok=False)
    assert result.exit_code == 1 and "no installed model was made for the CLIP of database artbench-baroque" in \
        result.output and "--model PATH or set $RDM_MODEL" in result.output


def test_offline_pull_fails_fast_with_what_to_do(rdm_env):
    started = time.perf_counter()
    result = rdm("pull", "artbench", "--url", "http://rdm-offline.invalid/artbench_databases.zip", "--quiet", ok=False)
    assert time.perf_counter() - started < 10
    assert result.exit_code == 1 and "cannot reach rdm-offline.invalid" in result.output
    assert "--url PATH" in result.output and "$RDM_PULL_MIRROR" in result.output and "Traceback" not in result.output


def test_an_unreachable_mirror_says_what_to_do(rdm_env, tmp_path):
    port = _closed_port()
    config = tmp_path / "config.yaml"  # never read: the download fails first
    config.write_text("model: {}\n")
    result = rdm("pull", "compvis-rdm768", "--url", f"http://127.0.0.1:{port}/model.ckpt", "--config", config,
                 "--force", "--quiet", ok=False)
    assert result.exit_code == 1 and f"cannot reach 127.0.0.1:{port}" in result.output
    assert "rdm pull compvis-rdm768 --url PATH" in result.output and "RDM_PULL_URL_COMPVIS_RDM768" in result.output


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- rdm.models.download on its own --------------------------------------------------------------------------

def test_an_interrupted_download_is_resumed_by_the_next_run(server, tmp_path):
    body = bytes(range(256)) * 4096  # 1 MiB
    server.ranges = True
    server.data["/stall.bin"] = body
    server.stall["/stall.bin"] = 300_000
    with pytest.raises(DownloadError, match="partial file is kept: run the same rdm pull again"):
        fetch(f"{server.base}/stall.bin", tmp_path / "stall.bin", progress=False)
    kept = (tmp_path / "stall.bin.part").stat().st_size
    assert 200_000 < kept <= 300_000 and not (tmp_path / "stall.bin").exists()  # what arrived, whole 64 KiB reads
    del server.stall["/stall.bin"]
    server.requests.clear()
    got = fetch(f"{server.base}/stall.bin", tmp_path / "stall.bin", progress=False)
    assert server.requests == [("/stall.bin", f"bytes={kept}-")]
    assert got.resumed_from == kept and (tmp_path / "stall.bin").read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).hexdigest() and not (tmp_path / "stall.bin.part").exists()


def test_a_server_without_ranges_or_with_a_changed_file_sends_it_whole(server, tmp_path):
    body = b"abcdefgh" * 50_000
    server.data["/plain.bin"] = body
    server.ranges = False
    server.drop_once["/plain.bin"] = 100_000
    got = fetch(f"{server.base}/plain.bin", tmp_path / "plain.bin", progress=False)
    assert got.path.read_bytes() == body  # the 200 answer to the Range request replaced the partial file
    server.ranges = True
    server.stall["/changed.bin"] = 1000
    server.data["/changed.bin"] = b"old!" * 10_000
    with pytest.raises(DownloadError):
        fetch(f"{server.base}/changed.bin", tmp_path / "changed.bin", progress=False)
    del server.stall["/changed.bin"]
    server.data["/changed.bin"] = b"new!" * 10_000
    server.modified += 10  # If-Range no longer matches: the server sends the new file whole
    assert fetch(f"{server.base}/changed.bin", tmp_path / "changed.bin", progress=False).path.read_bytes() == \
        b"new!" * 10_000


def test_a_wrong_digest_never_lands(server, tmp_path):
    server.data["/x.bin"] = b"x" * 1000
    with pytest.raises(download.DigestMismatch, match="pinned"):
        fetch(f"{server.base}/x.bin", tmp_path / "x.bin", "0" * 64, "the digest pinned in rdm", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- what rdm knows without downloading ---------------------------------------------------------------

def test_how_to_make_names_the_command():
    assert registry.how_to_make("artbench-baroque") == "rdm pull artbench"
    assert registry.how_to_make("openimages") == "rdm pull openimages"
    assert registry.how_to_make("wikiart") == "rdm build-index huggan/wikiart --name wikiart"
    assert registry.how_to_make("my-photos") is None
    assert registry.model_asset_for("ViT-L-14:openai").name == "compvis-rdm768"


def test_identity_only_records_the_clip_by_id_without_weights():
    emb = identity_only("ViT-L-14:openai", 768)
    assert emb.dim == 768 and emb.identity.weights_sha256 is None and emb.identity.architecture == "ViT-L-14"
    assert not hasattr(emb, "encode_text")
    with pytest.raises(Exception, match="makes 768-d vectors, but these are 512-d"):
        identity_only("ViT-L-14:openai", 512)
    with pytest.raises(Exception, match="neither a pretrained tag"):
        identity_only("ViT-L-14:no-such-tag", 768)
    full = EmbedderIdentity("ViT-L-14:openai", "ViT-L-14", "ab" * 32, 768, {"size": 224})
    assert emb.identity.same_vectors_as(full) and full.same_vectors_as(emb.identity)
    assert not emb.identity.same_vectors_as(identity_only("ViT-B-32:openai", 512).identity)
    assert not identity_only("ViT-L-14:laion2b_s32b_b82k", 768).identity.same_vectors_as(emb.identity)
