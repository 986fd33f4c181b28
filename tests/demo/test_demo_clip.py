"""The demo CLIP trainer: open_clip's own model and loss, a folder the embedder loads, a loss that drops."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from rdm.demo.clip import (
    CONFIG_FILE,
    DEMO_CLIP_CFG,
    TRAIN_INFO_FILE,
    WEIGHTS_FILE,
    ClipTrainConfig,
    build_model,
    cosine_lr,
    evaluate_clip,
    param_groups,
    train_clip,
)
from rdm.embed.embedder import Embedder
from rdm.errors import RDMError

SMALL_CFG = {  # a few-second stand-in for DEMO_CLIP_CFG: same towers, smaller
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = ClipTrainConfig(steps=40, batch_size=32, lr=2e-3, warmup=4, model_cfg=SMALL_CFG, log_every=10,
                             probe_every=20, probe_size=24)
    lines = []
    result = train_clip(config, out=tmp_path_factory.mktemp("demo_clip"), evaluate=False, log=lines.append)
    return config, result, lines


def test_loss_is_finite_and_drops(trained):
    _, result, lines = trained
    losses = np.array(result.losses)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-8:].mean() < losses[:8].mean() - 0.3  # ln(32) = 3.47 at chance
    assert sum("img/s" in line for line in lines) == 4 and sum("probe" in line for line in lines) == 2
    assert result.loss_summary(4)[-1][0] == 40
    assert [p["step"] for p in result.probes] == [20, 40]
    assert result.probes[-1]["colour"] > 1 / 8  # colour is learnt first


def test_saved_folder_loads_in_the_embedder(trained):
    _, result, _ = trained
    assert (result.path / CONFIG_FILE).is_file() and (result.path / TRAIN_INFO_FILE).is_file()
    cfg = json.loads((result.path / CONFIG_FILE).read_text())
    assert cfg["model_cfg"] == SMALL_CFG and cfg["preprocess_cfg"]["size"] == 32
    info = json.loads((result.path / TRAIN_INFO_FILE).read_text())
    assert info["train_config"]["steps"] == 40 and len(info["probes"]) == 2
    with safe_open(str(result.path / WEIGHTS_FILE), "pt") as f:  # saved in half precision
        assert f.get_tensor("visual.conv1.weight").dtype == torch.float16
    emb = Embedder.load(result.model_id, device="cpu", dtype="float32")
    assert emb.dim == 32 and emb.image_size == 32
    text = emb.encode_text(["a red star", "a blue circle, neon style"])
    assert text.shape == (2, 32) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert open_clip.get_tokenizer(result.model_id).context_length == 32


def test_evaluation_reports_every_check(trained):
    _, result, _ = trained
    emb = Embedder.load(result.model_id, device="cpu", dtype="float32")
    m = evaluate_clip(emb, n_per_style=12, k=2)
    for key in ("zero_shot_shape", "zero_shot_colour", "zero_shot_style", "text_to_image_shape_at_2",
                "text_to_image_colour_top1", "text_to_image_both_at_2", "image_knn_style_agreement",
                "image_knn_style_agreement_same_content"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["image_knn_colour_agreement"] > 1 / 8  # colour is learnt within a few steps


def test_same_seed_same_weights_and_losses():
    config = ClipTrainConfig(steps=3, batch_size=8, warmup=1, model_cfg=SMALL_CFG, probe_every=0)
    a, b = train_clip(config), train_clip(config)
    assert a.losses == b.losses


def test_demo_architecture_fits_the_size_budget():
    model = build_model(DEMO_CLIP_CFG, 0)
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 <= 12e6  # bytes in float16: the CLIP's share of the 40 MB demo budget
    assert model.visual.image_size == (64, 64)


def test_schedule_and_decay_groups():
    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-9)
    model = build_model(SMALL_CFG, 0)
    no_decay, decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])


def test_bad_settings_are_refused():
    with pytest.raises(RDMError, match="batch_size"):
        ClipTrainConfig(batch_size=1)
    with pytest.raises(RDMError, match="precision"):
        ClipTrainConfig(precision="fp8")
