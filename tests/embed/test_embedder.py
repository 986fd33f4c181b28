import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rdm.embed.embedder import Embedder, EmbedderIdentity, parse_model_id
from rdm.errors import EmbedderUnavailable, RDMError
from tests.helpers.imagezoo import base_picture


def test_local_dir_model_embeds_unit_vectors(tiny_clip):
    emb = Embedder.load(tiny_clip)
    images = [Image.fromarray(base_picture(s)) for s in range(5)]
    v = emb.encode_images(images, batch_size=2)
    t = emb.encode_text(["a red circle", "a blue square"])
    assert v.shape == (5, emb.dim) and t.shape == (2, emb.dim)
    assert v.dtype == np.float32 and t.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert not np.allclose(v[0], v[1])  # different pictures, different vectors
    # batching does not change an image's vector
    assert np.allclose(emb.encode_images(images[:1]), v[:1], atol=1e-5)


def test_identity_records_model_checksum_dim_preprocessing(tiny_clip):
    emb = Embedder.load(tiny_clip)
    ident = emb.identity
    assert ident.model == tiny_clip and ident.dim == 32 and len(ident.weights_sha256) == 64
    assert ident.preprocess["size"] in (32, [32, 32]) and "mean" in ident.preprocess
    again = EmbedderIdentity.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert again.same_vectors_as(ident)


def test_other_weights_other_identity(tiny_clip, tmp_path):
    from rdm.models.tiny import make_tiny_clip

    other = Embedder.load(make_tiny_clip(tmp_path / "other", seed=1))
    assert not other.identity.same_vectors_as(Embedder.load(tiny_clip).identity)


def test_cpu_dtype_is_within_1e2_cosine_of_float32(tiny_clip):
    fast = Embedder.load(tiny_clip, device="cpu")  # auto: bf16 where the CPU has it, validated
    exact = Embedder.load(tiny_clip, device="cpu", dtype="float32")
    images = [Image.fromarray(base_picture(s)) for s in range(8)]
    cos = (fast.encode_images(images) * exact.encode_images(images)).sum(1)
    assert cos.min() > 1 - 1e-2
    if torch.cpu._is_avx512_bf16_supported():
        assert fast.dtype == torch.bfloat16


def test_model_id_parsing():
    assert parse_model_id("ViT-B-32:openai") == ("tag", "ViT-B-32", "openai")
    assert parse_model_id("hf-hub:org/repo") == ("hf-hub", "org/repo", None)
    assert parse_model_id("local-dir:/x") == ("local-dir", "/x", None)
    for bad in ("", "ViT-B-32", "NotAModel:openai"):
        with pytest.raises(RDMError):
            parse_model_id(bad)


def test_missing_local_dir_is_clear(tmp_path):
    with pytest.raises(EmbedderUnavailable, match="open_clip_config.json"):
        Embedder.load(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_missing_weights_fail_fast_with_advice(tmp_path, env):
    """Not cached and no hub: an error within seconds that says how to point at local weights."""
    code = ("import time, sys\nfrom rdm.embed.embedder import Embedder\nfrom rdm.errors import EmbedderUnavailable\n"
            "t = time.time()\ntry:\n    Embedder.load(sys.argv[1])\nexcept EmbedderUnavailable as e:\n"
            "    print(round(time.time() - t, 2)); print(e)\n")
    base = {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for model in ("ViT-B-32:openai", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        t = time.time()
        out = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, timeout=120,
                             env={**base, **env})
        assert out.returncode == 0, out.stderr
        load_seconds = float(out.stdout.splitlines()[0])
        assert load_seconds < 5, f"took {load_seconds} s to fail"
        assert "local-dir:" in out.stdout and model in out.stdout
        assert time.time() - t < 60
