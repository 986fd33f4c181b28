"""`rdm train-vae`: a small KL autoencoder (diffusers AutoencoderKL) for latent-space presets.

The objective is LDM's first stage without its adversarial and perceptual parts (no LPIPS weights
offline, and a discriminator doubles the cost; `ldm/modules/losses/contperceptual.py`):

    loss = sum |x - D(z)| / B  +  kl_weight * sum KL(q(z|x) || N(0, I)) / B,   z ~ q(z|x)

(L2 with `loss="l2"`). After training, the latents' scale factor 1 / std(z) over the training images
is measured, as LDM's `scale_by_std` does, and stored as the autoencoder's `scaling_factor`; `rdm
train` measures it again on its own training set. The folder is `AutoencoderKL.save_pretrained`'s,
written atomically, plus `train_vae.json` (settings and final losses).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..errors import RDMError, SourceError
from ..sources import open_source
from ..util.files import atomic_folder
from ..util.progress import enabled as progress_bars
from .config import VAETrainConfig
from .data import encode_latents, latent_scale_factor, read_crops, to_unit_range
from .loop import MIXED_PRECISION, batch_indices, make_accelerator, step_generator
from .presets import load_preset

LOSSES = ("l1", "l2")


@dataclass
class VAETrainResult:
    path: Path  # the saved AutoencoderKL folder
    steps: int  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # total loss per step
    reconstruction: float = 0.0  # mean absolute error per pixel in [-1, 1] over the training images, at the end
    latent_scale_factor: float = 1.0  # 1 / std of the latents (stored as config.scaling_factor)
    latent_shape: tuple = ()  # (C, h, w) of one image's latents
    seconds: float = 0.0


class VAELoss(torch.nn.Module):
    """The autoencoder and its loss in one forward(), so that accelerate/DDP can wrap it."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, kind: str):
        super().__init__()
        self.vae, self.kl_weight, self.kind = vae, kl_weight, kind

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, per-pixel reconstruction) loss of x (B, 3, H, W) in [-1, 1]; z = mean + std * eps."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps.to(posterior.mean)  # (B, C, h, w)
        rec = self.vae.decode(z).sample.float()
        err = (rec - x).abs() if self.kind == "l1" else (rec - x) ** 2
        b = x.shape[0]
        kl = posterior.kl().float().sum() / b  # summed per image, as LDM's
        return err.sum() / b + self.kl_weight * kl, err.mean().detach()


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, pixels: np.ndarray, device, batch_size: int = 32) -> float:
    """Mean |x - D(mean(q(z|x)))| per pixel value in [-1, 1]."""
    errors = []
    for i in range(0, len(pixels), batch_size):
        x = to_unit_range(pixels[i:i + batch_size]).to(device)
        errors.append((vae.decode(vae.encode(x).latent_dist.mean).sample.float() - x).abs().mean(dim=(1, 2, 3)))
    return float(torch.cat(errors).mean())


def train_vae(cfg: VAETrainConfig) -> VAETrainResult:
    """Train an AutoencoderKL on the images of `cfg.data` and save it to `cfg.out`."""
    # 1. Settings
    preset = load_preset(cfg.preset)
    defaults = (preset.vae or {}).get("train", {})
    fallback = {"steps": 1000, "batch_size": 16, "lr": 1e-4, "kl_weight": 1e-6}
    cfg = dataclasses.replace(cfg, **{name: defaults.get(name, fallback[name]) for name in fallback
                                      if getattr(cfg, name) is None})
    cfg = dataclasses.replace(cfg, resolution=cfg.resolution or preset.resolution)
    if cfg.loss not in LOSSES:
        raise RDMError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise RDMError(f"mixed_precision must be one of {MIXED_PRECISION}, got {cfg.mixed_precision!r}")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RDMError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 2. The images, as uint8 crops in memory
    source = open_source(cfg.data, split=cfg.split, image_column=cfg.image_column)
    blocks = [crops for _, crops in read_crops(source, cfg.resolution, cfg.limit)]
    if not blocks:
        raise SourceError(f"no image could be read from {cfg.data}")
    pixels = np.concatenate(blocks)  # (N, R, R, 3)

    # 3. Model and optimizer
    torch.manual_seed(cfg.seed)
    vae = preset.vae_model(cfg.resolution)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.resolution % factor:
        raise RDMError(f"resolution {cfg.resolution} is not a multiple of the autoencoder's factor {factor}")
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))  # LDM's autoencoder optimizer
    latent_shape = (vae.config.latent_channels, cfg.resolution // factor, cfg.resolution // factor)
    objective, optimizer = accelerator.prepare(VAELoss(vae, cfg.kl_weight, cfg.loss), optimizer)

    # 4. The loop
    result = VAETrainResult(path=out, steps=0)
    bar = tqdm(total=cfg.steps, desc="train-vae", unit="step",
               disable=not (progress_bars(cfg.progress) and accelerator.is_main_process))
    start = time.perf_counter()
    for step in range(cfg.steps):
        generator = step_generator(cfg.seed, step, 0, rank)
        index = batch_indices(len(pixels), cfg.seed, step, cfg.batch_size * world)
        index = index[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        x = to_unit_range(pixels[index])
        if cfg.hflip:
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        eps = torch.randn((len(index), *latent_shape), generator=generator)
        loss, rec = objective(x.to(device), eps.to(device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not np.isfinite(value):
            raise RDMError(f"the autoencoder loss became {value} at step {step + 1}; lower --lr")
        result.losses.append(value)
        result.steps = step + 1
        bar.set_postfix(rec=f"{rec.item():.4f}")
        bar.update()
    bar.close()
    result.seconds = time.perf_counter() - start

    # 5. Scale factor, reconstruction error, atomic save
    vae = accelerator.unwrap_model(objective).vae.eval()
    moments = encode_latents(vae, pixels, device)
    result.latent_scale_factor = latent_scale_factor(moments, cfg.seed)
    result.latent_shape = latent_shape
    result.reconstruction = reconstruction_error(vae, pixels, device)
    vae.register_to_config(scaling_factor=result.latent_scale_factor, sample_size=cfg.resolution)
    if accelerator.is_main_process:
        _save(vae, out, {"config": dataclasses.asdict(cfg), "images": len(pixels), "steps": result.steps,
                         "final_loss": result.losses[-1] if result.losses else None,
                         "reconstruction_l1": result.reconstruction,
                         "latent_scale_factor": result.latent_scale_factor,
                         "latent_shape": list(result.latent_shape), "seconds": result.seconds})
    accelerator.wait_for_everyone()
    return result


def _save(vae: AutoencoderKL, out: Path, summary: dict) -> None:
    """save_pretrained into a temporary folder, then rename over `out`."""
    with atomic_folder(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "train_vae.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
