"""LoRA adapters (rdm.models.adapters): weight 0 is the base model bit for bit, mixing, refusals."""

import json
import shutil

import numpy as np
import pytest

from rdm.errors import RDMError
from rdm.models.assets import DEMO_MODEL
from rdm.sampling.pipeline import RDMPipeline
from tests.helpers import world as conftest

DEMO = DEMO_MODEL


@pytest.fixture(scope="module")
def pipe():
    return RDMPipeline.from_pretrained(DEMO)


def make_adapter(tmp, pipe, name, seed, base=None):
    return conftest.make_adapter(tmp / name, DEMO, seed, base or pipe.fingerprint)


def sample(pipe, adapters):
    pipe.set_adapters(adapters)
    q = np.random.default_rng(0).normal(size=(1, pipe.rdm_config.embedding_dim)).astype(np.float32)
    q /= np.linalg.norm(q)
    n = np.random.default_rng(1).normal(size=(1, 2, pipe.rdm_config.embedding_dim)).astype(np.float32)
    out = pipe(query_embeds=q, neighbor_embeds=n / np.linalg.norm(n, axis=-1, keepdims=True), num_inference_steps=3,
               seed=0, output_type="np")
    return out.images, out.provenance[0].model


def test_weight_zero_is_the_base_and_mixing(tmp_path, pipe):
    a, b = make_adapter(tmp_path, pipe, "a", 1), make_adapter(tmp_path, pipe, "b", 2)
    base, record = sample(pipe, [])
    assert "adapters" not in record
    with_a, record = sample(pipe, [(a, 1.0)])
    assert record["adapters"][0]["name"] == "a" and record["adapters"][0]["weight"] == 1.0
    assert not np.array_equal(with_a, base)  # the adapter changes the images
    assert np.array_equal(sample(pipe, [(a, 0.0)])[0], base)  # weight 0: the base, bit for bit
    assert np.array_equal(sample(pipe, [(a, 0.0), (b, 0.0)])[0], base)
    assert np.array_equal(sample(pipe, [(a, 1.0), (b, 0.0)])[0], with_a)  # (1, 0) = the first alone
    assert np.array_equal(sample(pipe, [])[0], base)  # switched off again: nothing left behind
    assert (a / "adapter_model.safetensors").stat().st_size < 2 * 2**20  # a few MB at most on the demo model


def test_refusals(tmp_path, pipe):
    other = make_adapter(tmp_path, pipe, "other", 3, base="f" * 64)
    with pytest.raises(RDMError, match="trained on model"):
        pipe.set_adapters([(other, 1.0)])
    bad = tmp_path / "bad"
    shutil.copytree(make_adapter(tmp_path, pipe, "good", 4), bad)
    data = bytearray((bad / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RDMError, match="sha256"):
        pipe.set_adapters([(bad, 1.0)])
    meta = json.loads((bad / "rdm_adapter.json").read_text())
    (bad / "rdm_adapter.json").write_text(json.dumps({**meta, "rank": "x"}))
    with pytest.raises(RDMError, match="rank"):
        pipe.set_adapters([(bad, 1.0)])
    pipe.set_adapters([])


def test_all_targets_by_record_version(tmp_path, pipe):
    """Format 2's "all" is every linear and conv layer; a version-1 record's "all" (without conv_in/conv_out, the
    shortcuts, samplers and time embedding) still loads with the layers it was made with."""
    from safetensors.torch import load_file

    from rdm.models.adapters import TARGETS_V1

    new = conftest.make_adapter(tmp_path / "new", DEMO, 5, pipe.fingerprint, targets="all")
    names = set(load_file(new / "adapter_model.safetensors"))
    assert {"conv_in.lora_A.weight", "conv_out.lora_B.weight", "time_embedding.linear_1.lora_A.weight"} <= names
    old = conftest.make_adapter(tmp_path / "old", DEMO, 6, pipe.fingerprint, targets="all",
                                layers=TARGETS_V1["all"])
    meta = json.loads((old / "rdm_adapter.json").read_text())
    with pytest.raises(RDMError, match="does not fit"):  # as a version-2 "all" it misses layers
        pipe.set_adapters([(old, 1.0)])
    (old / "rdm_adapter.json").write_text(json.dumps({**meta, "format_version": 1}))
    base, _ = sample(pipe, [])
    with_old, record = sample(pipe, [(old, 1.0)])
    assert record["adapters"][0]["name"] == "old" and not np.array_equal(with_old, base)
    (old / "rdm_adapter.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(RDMError, match="format_version 3"):
        pipe.set_adapters([(old, 1.0)])
    pipe.set_adapters([])


def test_the_shipped_cutout_adapter_fits_the_demo_model(tmp_path, pipe, monkeypatch):
    """rdm ships the demo's adapter: found by name when $RDM_ADAPTERS has none of that name, listed, loadable."""
    monkeypatch.setenv("RDM_ADAPTERS", str(tmp_path / "empty"))
    listed = conftest.run_cli("adapters", "--json", env=conftest.cli_env(RDM_ADAPTERS=str(tmp_path / "empty")))
    assert [a["name"] for a in json.loads(listed.output)] == ["cutout"]
    base, _ = sample(pipe, [])
    with_cutout, record = sample(pipe, [("cutout", 1.0)])
    assert record["adapters"][0]["name"] == "cutout" and record["adapters"][0]["targets"] == "all"
    assert not np.array_equal(with_cutout, base)
    pipe.set_adapters([])
