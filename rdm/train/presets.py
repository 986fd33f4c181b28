"""Named model sizes as data: `configs/<name>.json` holds a U-Net (and autoencoder) architecture plus
the training settings that suit it, as open_clip keeps its architectures in `model_configs/`.

    tiny           tests and smoke runs: 16x16 pixels, seconds on a CPU
    small          the demo: 64x64 pixels, trains on two CPU cores (why pixels: rdm.train's docstring),
                   with caption (text) queries so that the style comes from the neighbours
    small-latent   the same images as 16x16x4 latents of a small autoencoder (rdm train-vae)
    base           GPU scale: 256x256 images as 32x32x4 latents

small, small-latent and base train on a schedule rescaled to zero terminal SNR, with v-prediction and
trailing timesteps (Lin et al. 2024: no signal is left at t = T for the model to read the image's
colour from); tiny keeps CompVis' epsilon schedule, which the converted CompVis models use.

A JSON file of the same shape may be given instead of a name (`--config FILE`). The U-Net section
holds `diffusers.UNet2DConditionModel` arguments except the four that the data decide: `sample_size`,
`in_channels`, `out_channels` (the latent or pixel channels) and `cross_attention_dim` (the CLIP's
dimension). `attention_head_dim` is the number of heads per level, as diffusers reads it
(huggingface/diffusers#2011).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

from ..errors import RDMError
from .data import QUERY_KINDS

CONFIG_DIR = Path(__file__).parent / "configs"
SPACES = ("pixel", "latent")
DERIVED_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "cross_attention_dim")
TRAIN_KEYS = ("batch_size", "lr", "steps", "warmup_steps", "ema_decay", "k", "checkpoint_every", "sample_every",
              "query", "noise_schedule", "prediction_type", "zero_snr", "timestep_spacing")
VAE_TRAIN_KEYS = ("batch_size", "lr", "steps", "kl_weight")


@dataclass(frozen=True)
class Preset:
    """One model size: architecture and the training settings that suit it."""

    name: str  # preset name, or the JSON file's path
    description: str  # one line for `rdm train --help` and the logs
    resolution: int  # native image side in pixels
    space: str  # "pixel" (no autoencoder) or "latent" (needs an AutoencoderKL: --vae DIR)
    unet: dict  # UNet2DConditionModel kwargs, less DERIVED_UNET_KEYS
    train: dict  # defaults for TrainConfig: batch_size, lr, steps, warmup_steps, ema_decay, k, query, ...
    vae: dict = field(default_factory=dict)  # {"model": AutoencoderKL kwargs, "train": VAE trainer defaults}

    def unet_model(self, in_channels: int, sample_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
        """A freshly initialised U-Net of this preset for the given data."""
        return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                    cross_attention_dim=cross_attention_dim, **self.unet)

    def vae_model(self, resolution: int | None = None) -> AutoencoderKL:
        """A freshly initialised autoencoder of this preset (for `rdm train-vae`)."""
        if not self.vae.get("model"):
            raise RDMError(f"preset {self.name} defines no autoencoder (a 'vae': {{'model': ...}} section)")
        return AutoencoderKL(sample_size=resolution or self.resolution, **self.vae["model"])


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _check(d: dict, where: str) -> None:
    """Refuse a preset that misses fields or sets ones the data decide."""
    missing = [k for k in ("resolution", "space", "unet", "train") if k not in d]
    if missing:
        raise RDMError(f"{where}: missing {', '.join(missing)} (see rdm/train/configs/small.json)")
    if d["space"] not in SPACES:
        raise RDMError(f"{where}: space must be one of {SPACES}, got {d['space']!r}")
    derived = [k for k in DERIVED_UNET_KEYS if k in d["unet"]]
    if derived:
        raise RDMError(f"{where}: unet sets {', '.join(derived)}, which come from the data and the CLIP; remove them")
    unknown = sorted(set(d["train"]) - set(TRAIN_KEYS))
    if unknown:
        raise RDMError(f"{where}: unknown train settings {unknown}; known: {', '.join(TRAIN_KEYS)}")
    if d["train"].get("query", "image") not in QUERY_KINDS:
        raise RDMError(f"{where}: train.query must be one of {QUERY_KINDS}, got {d['train']['query']!r}")
    unknown = sorted(set((d.get("vae") or {}).get("train", {})) - set(VAE_TRAIN_KEYS))
    if unknown:
        raise RDMError(f"{where}: unknown vae.train settings {unknown}; known: {', '.join(VAE_TRAIN_KEYS)}")


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a preset JSON file by path."""
    path = Path(name_or_path).expanduser()
    if not path.suffix == ".json" or not path.is_file():
        if (CONFIG_DIR / f"{name_or_path}.json").is_file():
            path = CONFIG_DIR / f"{name_or_path}.json"
        else:
            raise RDMError(f"no preset '{name_or_path}': use one of {', '.join(list_presets())} or a JSON file path")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RDMError(f"cannot read preset {path}: {e}") from None
    name = path.stem if path.parent == CONFIG_DIR else str(path)
    _check(d, f"preset {name}")
    return Preset(name=name, description=d.get("description", ""), resolution=int(d["resolution"]),
                  space=d["space"], unet=dict(d["unet"]), train=dict(d["train"]), vae=dict(d.get("vae") or {}))
