"""The converted CompVis RDM reproduces the original latent-diffusion code number for number."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rdm.errors import RDMError
from rdm.models.convert.compvis import (
    convert_compvis_checkpoint,
    count_parameters_from_config,
    ema_key,
    map_key,
    unet_module_map,
)
from rdm.models.format import RDMConfig, load_model_components, model_fingerprint, save_model_folder
from tests.helpers.world import GOLDEN, SHARED, need

REFERENCE_768 = SHARED / "reference" / "compvis_rdm768x768.yaml"


@pytest.fixture(scope="module")
def settings():
    return json.loads((need(GOLDEN) / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return load_file(str(need(GOLDEN / "golden.safetensors")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, settings):
    """{"ema": folder, "raw": folder} converted from the golden checkpoint."""
    out = tmp_path_factory.mktemp("converted")
    ckpt, config = need(GOLDEN / "model.ckpt"), GOLDEN / "config.yaml"
    return {name: convert_compvis_checkpoint(ckpt, config, out / name, clip_dim=settings["clip_dim"],
                                             ema=(name == "ema"), k=settings["neighbors_k"])
            for name in ("ema", "raw")}


@pytest.fixture(scope="module")
def model(converted):
    return load_model_components(converted["ema"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_clip):
    """A tiny latent-space model folder's components (the format tests need no CompVis checkpoint)."""
    from rdm.embed import load_embedder
    from rdm.models.tiny import make_tiny_rdm

    folder = make_tiny_rdm(tmp_path_factory.mktemp("tiny") / "m", load_embedder(tiny_clip).identity.to_dict(),
                           resolution=32, k=4, vae_factor=4)
    return load_model_components(folder)


def ddim_guided(unet, scheduler, x_T, context, steps, guidance):
    """CompVis DDIM (eta 0) with classifier-free guidance eps_u + s * (eps_c - eps_u), zeros unconditional."""
    scheduler.set_timesteps(steps)
    x = x_T  # (B, C, h, w)
    for t in scheduler.timesteps:
        both = torch.cat([torch.zeros_like(context), context])  # (2B, 1+k, D): unconditional first
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


@pytest.mark.parity
@torch.no_grad()
def test_unet_matches_golden(model, golden):
    unet = model[0]
    eps = unet(golden["unet_x"], golden["unet_t"], encoder_hidden_states=golden["unet_context"]).sample
    assert (eps - golden["unet_eps"]).abs().max() < 1e-5


@pytest.mark.parity
@torch.no_grad()
def test_vae_matches_golden(model, golden, settings):
    _, vae, _, config, _ = model
    assert config.latent_scale_factor == settings["scale_factor"]
    decoded = vae.decode(golden["vae_z"] / config.latent_scale_factor).sample
    assert (decoded - golden["vae_decoded"]).abs().max() < 1e-4
    mean = vae.encode(golden["vae_image"]).latent_dist.mode()  # encode_first_stage(image).mode(), unscaled
    assert (mean - golden["vae_posterior_mean"]).abs().max() < 1e-4


@pytest.mark.parity
@torch.no_grad()
def test_ddim_sampling_matches_golden(model, golden, settings):
    unet, vae, scheduler, config, _ = model
    scheduler.set_timesteps(settings["ddim_steps"])
    assert scheduler.timesteps.flip(0).tolist() == golden["ddim_timesteps"].tolist()
    latents = ddim_guided(unet, scheduler, golden["ddim_xT"], golden["ddim_context"], settings["ddim_steps"],
                          settings["guidance_scale"])
    want = golden["ddim_latents"]
    assert (latents - want).abs().max() < 1e-5 * want.abs().max()
    images = ((vae.decode(latents / config.latent_scale_factor).sample + 1) / 2).clamp(0, 1)
    assert (images - golden["ddim_images"]).abs().max() < 1e-4


@pytest.mark.parity
def test_folder_records_settings_and_provenance(converted, model, settings):
    unet, vae, _, config, null_context = model
    assert null_context is None and config.unconditional == settings["unconditional"] == "zeros"
    assert config.k == settings["neighbors_k"] and config.query_token
    assert config.embedding_dim == settings["clip_dim"] == unet.config.cross_attention_dim
    assert config.resolution == settings["image_resolution"]
    assert config.latent_channels == settings["latent_shape"][0]
    assert sum(p.numel() for p in unet.parameters()) == settings["unet_params"]
    assert sum(p.numel() for p in vae.parameters()) == settings["vae_params"]
    raw = json.loads((converted["raw"] / "rdm_config.json").read_text())
    assert config.source["ema"] is (settings["weights"] == "ema") and raw["source"]["ema"] is False
    assert len(config.source["checkpoint_sha256"]) == 64
    index = json.loads((converted["ema"] / "model_index.json").read_text())
    assert index["_class_name"] == "RDMPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]


@pytest.mark.parity
@torch.no_grad()
def test_ema_and_raw_weights_differ(converted, golden):
    ema, raw = (load_file(str(converted[n] / "unet" / "diffusion_pytorch_model.safetensors")) for n in ("ema", "raw"))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    unet = load_model_components(converted["raw"])[0]
    eps = unet(golden["unet_x"], golden["unet_t"], encoder_hidden_states=golden["unet_context"]).sample
    assert (eps - golden["unet_eps"]).abs().max() > 1e-5  # the golden was made with the EMA weights
    assert model_fingerprint(converted["ema"]) != model_fingerprint(converted["raw"])


@pytest.mark.parity
def test_published_768_architecture_has_the_faithful_parameter_counts():
    counts = count_parameters_from_config(need(REFERENCE_768))
    assert counts == {"unet": 1_335_480_400, "vae": 69_610_963}


def test_key_mapping_examples():
    p = {"channel_mult": [1, 1, 1, 2], "num_res_blocks": 2, "attention_resolutions": [4, 2, 1]}
    m = unet_module_map(p)
    assert map_key("input_blocks.1.0.in_layers.2.weight", m) == "down_blocks.0.resnets.0.conv1.weight"
    assert map_key("input_blocks.3.0.op.bias", m) == "down_blocks.0.downsamplers.0.conv.bias"
    assert map_key("output_blocks.5.2.conv.weight", m) == "up_blocks.1.upsamplers.0.conv.weight"
    assert map_key("output_blocks.2.1.conv.weight", m) == "up_blocks.0.upsamplers.0.conv.weight"
    assert map_key("middle_block.1.transformer_blocks.0.attn2.to_k.weight", m) == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


@pytest.mark.parity
def test_wrong_config_and_incomplete_folder_are_refused(tmp_path, converted):
    (tmp_path / "bad.yaml").write_text("model: {target: foo.Bar, params: {}}\n")
    with pytest.raises(RDMError, match="LatentDiffusion"):
        convert_compvis_checkpoint(need(GOLDEN / "model.ckpt"), tmp_path / "bad.yaml", tmp_path / "out")
    with pytest.raises(RDMError, match="context_dim"):
        convert_compvis_checkpoint(GOLDEN / "model.ckpt", GOLDEN / "config.yaml", tmp_path / "out", clip_dim=768)
    broken = shutil.copytree(converted["ema"], tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RDMError, match="vae/diffusion_pytorch_model.safetensors"):
        load_model_components(broken)


def test_rdm_config_round_trip_and_version_check(tiny_model):
    config = tiny_model[3]
    assert RDMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(RDMError, match="format_version"):
        RDMConfig.from_dict({**config.to_dict(), "format_version": 2})
    with pytest.raises(RDMError, match="unconditional"):
        RDMConfig(**{**config.to_dict(), "unconditional": "noise"})


def test_learned_null_context_and_pixel_space_folders(tiny_model, tmp_path):
    unet, vae, scheduler, config, _ = tiny_model
    learned = dataclasses.replace(config, unconditional="learned")
    null = torch.randn(1 + config.k, config.embedding_dim)  # (1+k, D)
    with pytest.raises(RDMError, match="null_context"):
        save_model_folder(tmp_path / "m", unet, vae, scheduler, learned)
    save_model_folder(tmp_path / "m", unet, None, scheduler, learned, null_context=null)
    _, no_vae, _, loaded, loaded_null = load_model_components(tmp_path / "m")
    assert no_vae is None and loaded == learned and torch.equal(loaded_null, null)
    with pytest.raises(RDMError, match="not empty"):
        save_model_folder(tmp_path / "m", unet, None, scheduler, learned, null_context=null)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
