"""Tiny real components for tests and offline quickstarts (random weights, seconds to build).

`make_tiny_clip` writes a small open_clip model in open_clip's `local-dir:` format
(open_clip_config.json with model_cfg and preprocess_cfg, plus open_clip_model.safetensors), built
with open_clip's own classes, so the embedder loads it exactly as it loads a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG = {
    "size": 32, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
    "fill_color": 0,
}


def make_tiny_clip(path: str | Path, seed: int = 0, model_cfg: dict | None = None) -> str:
    """Write a random tiny open_clip model to `path`; return its model id ('local-dir:PATH')."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    pre = dict(TINY_PREPROCESS_CFG, size=cfg["vision_cfg"]["image_size"])
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=2))
    return f"local-dir:{path.resolve()}"


def make_tiny_rdm(path: str | Path, clip_identity: dict, resolution: int = 16, k: int = 3, seed: int = 0,
                  channels: int = 32, sampling: dict | None = None, vae_factor: int | None = None) -> Path:
    """Write a random tiny rdm model folder (U-Net of two `channels`-wide levels) for a CLIP identity: pixel space,
    or with `vae_factor` (a power of 2) a tiny AutoencoderKL that downsamples by it (latent space, 4 channels);
    `sampling`: the sampler settings it records (rdm.models.format.SamplingDefaults; None: none, the fallbacks)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from .format import RDMConfig, save_model_folder

    torch.manual_seed(seed)
    dim = int(clip_identity["dim"])
    vae, latent_channels, size = None, 3, resolution
    if vae_factor:
        levels = int(vae_factor).bit_length()  # one block per level, each but the last halves the side
        if 1 << (levels - 1) != vae_factor:
            raise ValueError(f"vae_factor must be a power of 2, got {vae_factor}")
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=resolution)
        latent_channels, size = 4, resolution // vae_factor
    unet = UNet2DConditionModel(sample_size=size, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(channels, channels),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=8)
    config = RDMConfig(embedder=dict(clip_identity), embedding_dim=dim, resolution=resolution,
                       latent_channels=latent_channels, k=k, sampling=dict(sampling or {}))
    return save_model_folder(path, unet, vae, DDIMScheduler(clip_sample=False), config, overwrite=True)
