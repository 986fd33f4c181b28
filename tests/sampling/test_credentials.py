"""Content credentials: every rdm PNG carries a C2PA manifest that c2pa-python (not rdm) reads and validates,
naming the neighbours as ingredients, with no server path; a changed pixel breaks it (rdm.sampling.credentials)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import c2pa
import numpy as np
import pytest
from PIL import Image

from rdm.errors import RDMError
from rdm.sampling.credentials import make_identity, read
from tests.helpers.world import run_cli as rdm
from tests.helpers.world import tiny_collection

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("cred")
    home, model = tiny_collection(root, tiny_clip, 10, 300, "styles")
    chain, key, ca = make_identity("rdm test signer")  # a CA and an end-entity certificate, made here
    for name, data in (("chain.pem", chain), ("key.pem", key), ("ca.pem", ca)):
        (root / name).write_bytes(data)
    return {"root": root, "home": home, "model": model}


def sample(world, out: Path, *args, env=None):
    return rdm("--indexes", world["home"], "sample", "a red circle", "--db", "styles", "--model", world["model"],
               "--out", out, "--steps", 3, "--quiet", *args, env=env)


def c2pa_read(data: bytes, anchors: bytes | None = None):
    """c2pa-python's own reader: (validation state, codes, active manifest)."""
    settings = {"trust": {"user_anchors": anchors.decode()}} if anchors else {}
    with c2pa.Reader("image/png", io.BytesIO(data), context=c2pa.Context.from_dict(settings)) as r:
        store = json.loads(r.json())
        return r.get_validation_state(), [s["code"] for s in store.get("validation_status") or []], \
            r.get_active_manifest()


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def with_pixel_changed(data: bytes) -> bytes:
    """The same PNG file (its manifest chunk kept) with one pixel changed and its image data re-encoded."""
    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    image[0, 0] = 255 - image[0, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    idat = b"".join(d for t, d in chunks(buf.getvalue()) if t == b"IDAT")
    kept, done = [], False
    for t, d in chunks(data):
        if t == b"IDAT":
            if not done:
                kept.append((t, idat))
                done = True
            continue
        kept.append((t, d))
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
                                          for t, d in kept)


def test_a_signed_png_names_its_neighbours_as_ingredients_and_a_changed_pixel_invalidates_it(world, tmp_path):
    root = world["root"]
    out = sample(world, tmp_path / "signed", "--sign-key", root / "key.pem", "--sign-cert", root / "chain.pem")
    assert "signed with your key" in out.output
    png = next((tmp_path / "signed").glob("a-red-circle-0.png"))
    record = json.loads(png.with_suffix(".json").read_text())
    data = png.read_bytes()

    state, codes, manifest = c2pa_read(data, (root / "ca.pem").read_bytes())
    assert state == "Trusted" and codes == []
    ingredients = [i["metadata"]["org.rdm.neighbour"] for i in manifest["ingredients"]]
    assert [(i["collection"], i["id"]) for i in ingredients] == [(h["database"], h["id"])
                                                                for h in record["neighbours"]]
    assert all(abs(i["score"] - h["score"]) < 1e-6 for i, h in zip(ingredients, record["neighbours"]))
    action = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"][0]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"].endswith("trainedAlgorithmicMedia")
    assert action["parameters"]["org.rdm.model"]["fingerprint"] == record["model"]["fingerprint"]
    generation = next(a for a in manifest["assertions"] if a["label"] == "org.rdm.generation")["data"]
    assert generation["query"] == {"prompt": "a red circle"} and generation["seed"] == 0
    text = json.dumps(manifest)
    for private in (str(tmp_path), str(root), str(Path.cwd()), str(Path.home())):
        assert private not in text  # no server path anywhere
    assert all(Path(h["path"]).is_absolute() for h in record["neighbours"])  # (they were there to leak)

    state, codes, _ = c2pa_read(with_pixel_changed(data), (root / "ca.pem").read_bytes())
    assert state == "Invalid" and "assertion.dataHash.mismatch" in codes
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(io.BytesIO(data))))

    grid_state, _, grid_manifest = c2pa_read((tmp_path / "signed" / "a-red-circle-0-grid.png").read_bytes(),
                                             (root / "ca.pem").read_bytes())
    assert grid_state == "Trusted" and len(grid_manifest["ingredients"]) == 3  # the grid is signed too
    verified = rdm("verify-image", png, "--trust", root / "ca.pem")
    assert "valid, signed by a trusted identity" in verified.output and "styles/" in verified.output
    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(with_pixel_changed(data))
    bad = rdm("verify-image", tampered, "--trust", root / "ca.pem", ok=False)
    assert bad.exit_code == 1 and "INVALID" in bad.output and "dataHash.mismatch" in bad.output


def test_without_a_key_the_manifest_is_embedded_with_the_local_identity_and_the_output_says_so(world, tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setenv("RDM_HOME", str(tmp_path / "rdmhome"))
    monkeypatch.delenv("RDM_SIGN_KEY", raising=False)
    out = sample(world, tmp_path / "local")
    assert "rdm's local identity, which no one else trusts" in out.output
    data = (tmp_path / "local" / "a-red-circle-0.png").read_bytes()
    state, codes, manifest = c2pa_read(data)
    assert state == "Valid" and codes == ["signingCredential.untrusted"]  # intact, signer not trusted
    assert len(manifest["ingredients"]) == 3
    assert oct((tmp_path / "rdmhome" / "c2pa" / "key.pem").stat().st_mode & 0o777) == "0o600"
    off = sample(world, tmp_path / "off", "--no-credentials")
    assert "content credentials: none" in off.output
    with pytest.raises(RDMError, match="no content credentials"):
        read(tmp_path / "off" / "a-red-circle-0.png")
    assert rdm("verify-image", tmp_path / "off" / "a-red-circle-0.png", ok=False).exit_code != 0


def test_bad_signing_material_is_refused_before_sampling(world, tmp_path):
    root = world["root"]
    (tmp_path / "notakey.pem").write_text("hello")
    result = rdm("--indexes", world["home"], "sample", "a red circle", "--db", "styles", "--model", world["model"],
                 "--out", tmp_path / "o", "--sign-key", tmp_path / "notakey.pem", "--sign-cert", root / "chain.pem",
                 ok=False)
    assert result.exit_code != 0 and "not a PEM private key" in result.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))
    only_key = rdm("--indexes", world["home"], "sample", "a red circle", "--db", "styles", "--model", world["model"],
                   "--out", tmp_path / "o", "--sign-key", root / "key.pem", ok=False)
    assert "give both a signing key and its certificate" in only_key.output
