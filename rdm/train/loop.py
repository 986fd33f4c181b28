"""`rdm train`: fit a retrieval-conditioned U-Net with accelerate (CPU, one GPU or many).

One optimizer step, as RDM training does it (Blattmann et al. 2022, Sec. 3.2):
  1. take the step's images (a fixed function of seed and step: the data order needs no saved state)
  2. x0 = their cached latents (a fresh posterior sample, times the latent scale) or pixels
  3. context = [query, k nearest database neighbours]  (B, 1+k, D)
     - the query is the image's own CLIP embedding (`query="image"`, as the RDM paper trains), its
       caption's CLIP text embedding (`"text"`), or either at random per example (`"mixed"`). The
       neighbours are always mined with the image embedding. At inference the query is a prompt's
       text embedding that names the content only ("a red star"): an image query carries the style
       too, so the model learns to take the style from the query and to ignore the neighbours, and
       swapping the database no longer swaps the style; a text query leaves the style to them
     - each image keeps a random number k' in [1, k] of its nearest neighbours; the other slots are
       zeroed AND masked out of cross-attention (`encoder_attention_mask`), so a step with k' is
       exactly the unpadded (B, 1+k', D) context the pipeline builds at inference with k = k'
     - with probability `cond_drop` the whole context is zeros: the unconditional context that
       classifier-free guidance uses at inference (rdm.sampling.conditioning.unconditional_context)
     - with probability `neighbour_drop` the neighbour slots alone are zeros (unmasked), the query kept: the
       query-only context of two-condition guidance (`--style-scale`, rdm.sampling.conditioning.style_guided_noise)
  4. t ~ U{0..999}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; loss = MSE(U-Net(x_t, t, context), eps or v)
     - the schedule: NOISE_SCHEDULES, optionally rescaled to zero terminal SNR, which needs v-prediction, and
       sampled with trailing timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
       Flawed", Sec. 3.1-3.3); all three are saved in the model's scheduler config, so sampling uses them
  5. clip gradients, AdamW, lr schedule, EMA of the weights (LitEma's decay warm-up)

Randomness (noise, t, k', dropout, posterior samples, mixed queries) comes from a generator seeded by (seed, step,
micro-batch, process), so a resumed run draws exactly what an uninterrupted run draws.

The run folder (`out`):
    model/                       the rdm model folder (rdm.models.format) with the EMA weights; rewritten
                                 at every checkpoint and at the end: `rdm sample --model OUT/model`
    checkpoints/step-0000500/    accelerate state (model, optimizer, EMA, lr schedule, RNG) + train_state.json
    samples/step-0000500.png     sample grid from fixed validation queries, EMA weights
    train_config.json            the resolved TrainConfig (a resume must match the checkpoint's copy)
    metrics.jsonl                step, loss, lr, images/s, data time

Several GPUs: `accelerate launch -m rdm.cli train ...` (every process builds the same global batch
and takes its slice; batch_size is per process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from ..db import store
from ..db.database import Database
from ..embed import embedder_for, load_embedder
from ..embed.embedder import Embedder
from ..errors import RDMError
from ..models.convert.compvis import scheduler_config_from_compvis
from ..models.format import (
    PREDICTION_TYPES,
    RDMConfig,
    load_model_components,
    model_fingerprint,
    read_rdm_config,
    save_model_folder,
)
from ..sampling import conditioning as cond
from ..sampling.pipeline import RDMPipeline
from ..sources import open_source
from ..util.progress import enabled as progress_bars
from .config import TrainConfig
from .data import QUERY_KINDS, TrainingData, latent_scale_factor, prepare_training_data
from .presets import Preset, load_preset

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINTS, SAMPLES, MODEL, ADAPTER = "checkpoints", "samples", "model", "adapter"
ADAPTER_LR = 1e-3  # adapters' default learning rate (LoRA trains well at about 10x a full fine-tune's)
CONFIG_FILE, METRICS_FILE, STATE_FILE = "train_config.json", "metrics.jsonl", "train_state.json"
# Fields a resumed run may change; every other field must equal the checkpointed run's.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "keep_checkpoints", "resume", "progress",
                     "cache_dir", "indexes", "num_val", "sample_steps", "guidance_scale", "cpu", "threads"}
# Values of fields added since, for checkpoints written before they existed (those runs trained this way).
FIELDS_BEFORE_THEY_EXISTED = {"query": "image", "caption_column": None, "noise_schedule": "ldm", "zero_snr": False,
                              "timestep_spacing": "leading", "neighbour_drop": 0.0, "adapter": None, "rank": 4,
                              "lora_alpha": None, "targets": "cross-attention"}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing; trailing starts at t = T
LDM_SCHEDULE = {"linear_start": 0.0015, "linear_end": 0.015, "timesteps": 1000}  # CompVis RDM configs
# Noise schedules by name, as DDIMScheduler settings. "ldm" is the CompVis latent schedule (scaled_linear
# 0.0015..0.015): at t = T it keeps sqrt(alpha_bar) = 0.028 of the signal, which in pixel space is as large as
# the mean of 64x64 Gaussian noise (1/64), so a model trained on it reads the initial noise's mean as the
# image's colour and samples tinted images. "ddpm" (Ho et al. 2020, linear 1e-4..0.02, for pixels) keeps 0.006.
NOISE_SCHEDULES = {
    "ldm": {"beta_schedule": "scaled_linear", "beta_start": LDM_SCHEDULE["linear_start"],
            "beta_end": LDM_SCHEDULE["linear_end"]},
    "ddpm": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
}
# Pixel-space models sample with the predicted x0 clipped to the image range, as DDPM (Ho et al. 2020) does: at
# high noise an eps-model's x0 estimate is far out of range, and unclipped it tints whole images (the demo model's
# deterministic samples came out magenta or cyan). It changes sampling only, not training.
PIXEL_SAMPLING = {"clip_sample": True, "clip_sample_range": 1.0}


@dataclass
class TrainResult:
    """What a run did."""

    out: Path  # the run folder
    model_dir: Path  # the exported model folder (EMA weights)
    step: int  # optimizer steps done in total
    start_step: int  # the step this invocation started from (0, or the checkpoint's)
    losses: list[float] = field(default_factory=list)  # training loss of each step of this invocation
    seconds: float = 0.0  # wall time of the optimizer steps of this invocation
    data_seconds: float = 0.0  # of which assembling batches
    images_per_second: float = 0.0  # training images per second (all processes), first step excluded
    data: dict = field(default_factory=dict)  # training-data summary: images, excluded neighbours, cache
    adapter_dir: Path | None = None  # with --adapter: the published adapter folder ($RDM_ADAPTERS/NAME)


# --- configuration ----------------------------------------------------------------------------------

_FALLBACK = {"batch_size": 16, "lr": 1e-4, "steps": 1000, "warmup_steps": 0, "ema_decay": 0.9999,
             "checkpoint_every": 0, "sample_every": 0}  # for preset files that leave a train setting out


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, Preset, RDMConfig | None]:
    """Fill the None fields from the preset (and the --init model); check every value."""
    preset = load_preset(cfg.preset)
    init_config = None
    if cfg.adapter is not None:
        from ..models.adapters import check_name, lora_config

        check_name(cfg.adapter)
        if not cfg.init:  # the model users sample with for this database's CLIP
            from ..sampling.generate import choose_model

            cfg = dataclasses.replace(cfg, init=str(choose_model([cfg.db], cfg.indexes)))
        if cfg.lora_alpha is None:
            cfg = dataclasses.replace(cfg, lora_alpha=float(cfg.rank))
        if cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=ADAPTER_LR)
        lora_config(cfg.rank, cfg.lora_alpha, cfg.targets)  # checks rank, alpha and targets
    if cfg.init:
        init_config = read_rdm_config(cfg.init)
    filled = {}
    for name in ("batch_size", "lr", "steps", "warmup_steps", "ema_decay", "checkpoint_every", "sample_every"):
        if getattr(cfg, name) is None:
            filled[name] = preset.train.get(name, _FALLBACK[name])
    if cfg.k is None:
        filled["k"] = init_config.k if init_config and init_config.k > 0 else preset.train.get("k", 4)
    if cfg.resolution is None:
        filled["resolution"] = init_config.resolution if init_config else preset.resolution
    if cfg.prediction_type is None:
        filled["prediction_type"] = init_config.prediction_type if init_config else \
            preset.train.get("prediction_type", "epsilon")
    if cfg.query is None:
        filled["query"] = preset.train.get("query", "image")
    if not cfg.init:  # fine-tuning keeps the --init model's schedule unless told otherwise
        for name, default in (("noise_schedule", "ldm"), ("zero_snr", False), ("timestep_spacing", "leading")):
            if getattr(cfg, name) is None:
                filled[name] = preset.train.get(name, default)
    cfg = dataclasses.replace(cfg, **filled)
    _check(cfg, init_config)
    return cfg, preset, init_config


def _check(cfg: TrainConfig, init_config: RDMConfig | None) -> None:
    """Refuse impossible settings with a message that says what to change."""
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "k": cfg.k,
                "resolution": cfg.resolution, "num_val": cfg.num_val, "sample_steps": cfg.sample_steps}
    bad = [f"{n}={v}" for n, v in positive.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise RDMError(f"training settings must be positive integers: {', '.join(bad)}")
    if not cfg.lr > 0:
        raise RDMError(f"the learning rate must be positive, got {cfg.lr}")
    if not 0.0 <= cfg.cond_drop < 1.0 or not 0.0 <= cfg.neighbour_drop < 1.0:
        raise RDMError(f"cond_drop and neighbour_drop are probabilities in [0, 1), got {cfg.cond_drop} and "
                       f"{cfg.neighbour_drop}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise RDMError(f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise RDMError(f"mixed_precision must be one of {MIXED_PRECISION}, got {cfg.mixed_precision!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise RDMError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.query not in QUERY_KINDS:
        raise RDMError(f"query must be one of {QUERY_KINDS}, got {cfg.query!r}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise RDMError(f"prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}")
    if cfg.noise_schedule is not None and cfg.noise_schedule not in NOISE_SCHEDULES:
        raise RDMError(f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got {cfg.noise_schedule!r}")
    if cfg.timestep_spacing is not None and cfg.timestep_spacing not in TIMESTEP_SPACINGS:
        raise RDMError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {cfg.timestep_spacing!r}")
    if cfg.adapter is not None:
        changed = [f"--{n.replace('_', '-')}" for n in ("noise_schedule", "zero_snr", "timestep_spacing", "vae")
                   if getattr(cfg, n) is not None]
        if cfg.prediction_type != init_config.prediction_type:
            changed.append("--prediction-type")
        if cfg.resolution != init_config.resolution:
            changed.append("--resolution")
        if changed:
            raise RDMError(f"an adapter trains on top of the base model as it is: {', '.join(changed)} would change "
                           "what the base model predicts or sees; leave them out")
    if init_config is not None:
        if cfg.vae is not None:
            raise RDMError("--vae cannot be combined with --init: the model's U-Net was trained on its own "
                           "autoencoder's latents, which fine-tuning keeps")
        if init_config.unconditional != "zeros" or not init_config.query_token:
            raise RDMError("the --init model uses a learned unconditional context or no query token; rdm train "
                           "trains [query, neighbours] contexts with a zeros unconditional context")


def _compatible(saved: dict, current: dict) -> list[str]:
    """Fields that differ between a checkpointed run's config and this one (steps may grow, etc.)."""
    saved = {**FIELDS_BEFORE_THEY_EXISTED, **saved}
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
             if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if current.get("lr_schedule") == "cosine" and saved.get("steps") != current.get("steps"):
        diffs.append(f"steps: {saved.get('steps')} -> {current.get('steps')} (the cosine schedule depends on it)")
    return diffs


# --- model ------------------------------------------------------------------------------------------

@dataclass
class Model:
    """The parts being trained or used: U-Net, optional autoencoder, noise schedule."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    scheduler: DDIMScheduler
    latent_scale_factor: float | None  # None: measure it on the training latents (LDM scale_by_std)
    source: dict  # provenance for rdm_config.json


def build_model(cfg: TrainConfig, preset: Preset, embedding_dim: int) -> Model:
    """A fresh U-Net from the preset (with --vae), or the --init model's parts."""
    if cfg.init:
        unet, vae, scheduler, config, _ = load_model_components(cfg.init)
        if unet.config.cross_attention_dim != embedding_dim:
            raise RDMError(f"the --init model's U-Net attends to {unet.config.cross_attention_dim}-d context tokens, "
                           f"but the database's CLIP makes {embedding_dim}-d embeddings; use a database built "
                           "with a CLIP of that dimension")
        if not hasattr(scheduler, "add_noise"):
            raise RDMError(f"the --init model's scheduler {type(scheduler).__name__} cannot add noise for training")
        # fine-tuning may move onto another noise schedule or prediction type; pixel-space models sample with x0
        # clipped
        changes = {**(NOISE_SCHEDULES[cfg.noise_schedule] if cfg.noise_schedule else {}),
                   **_schedule_options(cfg), "prediction_type": cfg.prediction_type,
                   **(PIXEL_SAMPLING if vae is None else {})}
        scheduler = _check_schedule(type(scheduler).from_config(scheduler.config, **changes))
        if vae is not None:
            vae.requires_grad_(False)
        _check_resolution(cfg.resolution, vae)
        return Model(unet.train(), vae, scheduler, config.latent_scale_factor,
                     {"init": str(Path(cfg.init).resolve()), "init_fingerprint": model_fingerprint(cfg.init),
                      "init_source": config.source})
    vae = _load_vae(cfg.vae, preset)
    factor = _check_resolution(cfg.resolution, vae)
    channels = 3 if vae is None else vae.config.latent_channels
    torch.manual_seed(cfg.seed)
    unet = preset.unet_model(channels, cfg.resolution // factor, embedding_dim)
    params = dict(LDM_SCHEDULE, parameterization="v" if cfg.prediction_type == "v_prediction" else "eps")
    scheduler = _check_schedule(DDIMScheduler(**{**scheduler_config_from_compvis(params),
                                                 **NOISE_SCHEDULES[cfg.noise_schedule], **_schedule_options(cfg),
                                                 **(PIXEL_SAMPLING if vae is None else {})}))
    return Model(unet.train(), vae, scheduler, 1.0 if vae is None else None,
                 {"preset": preset.name, "vae": None if vae is None else str(cfg.vae)})


def _schedule_options(cfg: TrainConfig) -> dict:
    """The scheduler settings chosen (None: kept) for zero terminal SNR and the timestep spacing."""
    chosen = {"rescale_betas_zero_snr": cfg.zero_snr, "timestep_spacing": cfg.timestep_spacing}
    return {k: v for k, v in chosen.items() if v is not None}


def _check_schedule(scheduler):
    """Refuse zero terminal SNR with epsilon prediction: at t = T the input holds no signal, so x0 cannot be
    recovered from a noise prediction (Lin et al. 2024, Sec. 3.2)."""
    if scheduler.config.get("rescale_betas_zero_snr") and scheduler.config.prediction_type == "epsilon":
        raise RDMError("zero terminal SNR needs --prediction-type v_prediction: at t = T an epsilon prediction "
                       "says nothing about the image (Lin et al. 2024)")
    return scheduler


def _check_resolution(resolution: int, vae: AutoencoderKL | None) -> int:
    """The autoencoder's downsampling factor (1 in pixel space); the resolution must be a multiple."""
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise RDMError(f"resolution {resolution} is not a multiple of the autoencoder's downsampling factor {factor}")
    return factor


def _load_vae(spec: str | None, preset: Preset) -> AutoencoderKL | None:
    """--vae DIR | none; a latent preset without one is an error (train one with `rdm train-vae`)."""
    if spec is None and preset.space == "latent":
        raise RDMError(f"preset {preset.name} trains in latent space: pass --vae DIR (an AutoencoderKL folder, e.g. "
                       "from `rdm train-vae`) or --vae none for pixel space")
    if spec is None or str(spec).lower() == "none":
        return None
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise RDMError(f"--vae {spec}: not an AutoencoderKL folder (config.json + safetensors, as save_pretrained "
                       "writes); train one with `rdm train-vae`")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True).eval().requires_grad_(False)


# --- one step's batch -------------------------------------------------------------------------------

def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of (seed, step, micro-batch, process)."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def batch_indices(n: int, seed: int, micro_index: int, global_batch: int) -> np.ndarray:
    """Indices of global micro-batch `micro_index` in an endless stream of per-epoch permutations of range(n)."""
    positions = np.arange(micro_index * global_batch, (micro_index + 1) * global_batch)
    epochs = positions // n
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def neighbour_keep(counts: torch.Tensor, k: int, generator: torch.Generator, random_k: bool) -> torch.Tensor:
    """(B, k) bool: the nearest k' of each image's neighbours, k' ~ U{1..k} (capped by what it has)."""
    if random_k:
        drawn = torch.randint(1, k + 1, (len(counts),), generator=generator)
        kept = torch.minimum(drawn, counts)
    else:
        kept = counts
    return torch.arange(k)[None, :] < kept[:, None]  # (B, k)


def training_context(query: torch.Tensor, neighbours: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor,
                     drop_neighbours: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 1+k, D), mask (B, 1+k)): [query, kept neighbours], dropped slots zero and masked out;
    rows with `drop_neighbours` [query, 0, ..., 0] unmasked (rdm.sampling.conditioning.query_only_context); rows with
    `drop` all zeros (the classifier-free guidance context), unmasked."""
    neighbours = neighbours * keep[..., None]  # (B, k, D)
    context = cond.build_context(query, neighbours)  # (B, 1+k, D)
    mask = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # (B, 1+k)
    if drop_neighbours is not None:
        context = torch.where(drop_neighbours[:, None, None], cond.query_only_context(context), context)
        mask = mask | drop_neighbours[:, None]
    context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
    mask = mask | drop[:, None]
    return context, mask


def make_batch(data: TrainingData, index: np.ndarray, generator: torch.Generator, scale: float, cfg: TrainConfig,
               timesteps: int, device: torch.device) -> dict:
    """x0, context, mask, noise and timesteps t ~ U{0..timesteps-1} of one micro-batch, on `device`."""
    x0 = data.x0(index, generator, scale)  # (B, C, h, w)
    counts = torch.from_numpy(data.neighbours.counts[index])
    keep = neighbour_keep(counts, data.k, generator, cfg.random_k)  # (B, k)
    drop = torch.rand(len(index), generator=generator) < cfg.cond_drop  # (B,)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, timesteps, (len(index),), generator=generator)
    query = data.query_tokens(index, cfg.query, generator)  # (B, D); "mixed" alone draws
    drop_neighbours = torch.rand(len(index), generator=generator) < cfg.neighbour_drop if cfg.neighbour_drop \
        else None  # drawn last, and only when asked for: runs without it draw what they always drew
    context, mask = training_context(query, torch.from_numpy(data.neighbour_vectors[index]), keep, drop,
                                     drop_neighbours)
    return {k: v.to(device) for k, v in dict(x0=x0, context=context, mask=mask, noise=noise, t=t).items()}


def diffusion_loss(unet, scheduler, batch: dict, prediction_type: str) -> torch.Tensor:
    """MSE between the U-Net's output and eps (DDPM, Ho et al. 2020, Eq. 14) or v (Salimans & Ho 2022)."""
    x0, noise, t = batch["x0"], batch["noise"], batch["t"]
    xt = scheduler.add_noise(x0, noise, t)
    pred = unet(xt, t, encoder_hidden_states=batch["context"], encoder_attention_mask=batch["mask"]).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float())


# --- checkpoints, export, samples -------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in a run folder, oldest first."""
    found = []
    for d in (Path(out) / CHECKPOINTS).glob("step-*"):
        if (d / STATE_FILE).is_file():
            found.append((json.loads((d / STATE_FILE).read_text())["step"], d))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, cfg: TrainConfig, keep: int) -> Path:
    """accelerate's state plus train_state.json, written to a temporary folder and renamed."""
    final = out / CHECKPOINTS / checkpoint_name(step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": cfg.to_dict()}, indent=1) + "\n")
        store.commit_folder(tmp, final)  # fsynced, then renamed: a checkpoint is whole or absent
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def ema_unet(unet: UNet2DConditionModel, ema: EMAModel) -> UNet2DConditionModel:
    """A copy of the U-Net holding the EMA weights, in eval mode."""
    copy_ = copy.deepcopy(unet)
    ema.copy_to(copy_.parameters())
    return copy_.eval()


def rdm_config_for(cfg: TrainConfig, model: Model, embedder: Embedder, scale: float, db: Database,
                   data: TrainingData, step: int) -> RDMConfig:
    """rdm_config.json of the exported model."""
    unet = model.unet
    return RDMConfig(embedder=embedder.identity.to_dict(), embedding_dim=embedder.dim, resolution=cfg.resolution,
                     latent_channels=unet.config.in_channels, latent_scale_factor=float(scale), k=cfg.k,
                     query_token=True, unconditional="zeros", prediction_type=cfg.prediction_type,
                     sampling={"num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale},
                     source={"format": "rdm-train", "trainer": "rdm.train", "step": step, "ema": True,
                             "data": cfg.data, "images": len(data), "query": cfg.query, "database": db.name,
                             "database_fingerprint": db.fingerprint, "dedup_threshold": cfg.dedup_threshold,
                             **model.source})


def save_adapter_of_run(folder: Path, unet, cfg: TrainConfig, model: Model, db: Database, step: int):
    """The run's adapter folder (rdm.models.adapters), with what it was made for."""
    from ..models.adapters import save_adapter

    meta = {"rank": cfg.rank, "alpha": cfg.lora_alpha, "targets": cfg.targets,
            "base_fingerprint": model.source["init_fingerprint"], "base_model": Path(cfg.init).name,
            "database": db.name, "database_fingerprint": db.fingerprint, "steps": step, "seed": cfg.seed,
            "lr": cfg.lr, "query": cfg.query}
    return save_adapter(folder, unet, meta)


def sample_grid(unet, vae, scheduler, config: RDMConfig, query: np.ndarray, neighbours: np.ndarray,
                references: np.ndarray | None, path: Path, steps: int, guidance_scale: float, seed: int,
                per_query: int = 3, device=None) -> Path:
    """A PNG grid, one row per validation query: [reference crop?] then `per_query` samples
    (RDMPipeline with the given weights, seeds seed..seed+per_query-1 for every row)."""
    pipe = RDMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config), vae=vae, rdm_config=config)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for q in range(len(query)):
        out = pipe(query_embeds=np.repeat(query[q:q + 1], per_query, 0),
                   neighbor_embeds=np.repeat(neighbours[q:q + 1], per_query, 0), num_inference_steps=steps,
                   guidance_scale=guidance_scale, seed=seed, output_type="np")
        cells = list((out.images * 255).round().astype(np.uint8))  # per_query x (H, W, 3)
        if references is not None:
            cells.insert(0, references[q])
        rows.append(np.concatenate(cells, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def reference_images(data: TrainingData, index: np.ndarray, vae, device) -> np.ndarray:
    """uint8 (V, H, W, 3) crops of validation images (decoded posterior means in latent space)."""
    if data.space == "pixel":
        return np.ascontiguousarray(np.asarray(data.latents[index]).transpose(0, 2, 3, 1))
    mean = torch.from_numpy(np.asarray(data.latents[index])).float().chunk(2, dim=1)[0].to(device)
    with torch.no_grad():
        x = vae.decode(mean.to(vae.dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# --- the run ----------------------------------------------------------------------------------------

def _open_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: start at step 0)."""
    out = Path(cfg.out).expanduser()
    if not cfg.resume:
        if out.exists() and any(out.iterdir()):
            raise RDMError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
        return out, None
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        if (out / CONFIG_FILE).is_file():
            warnings.warn(f"{out} holds no checkpoint yet: training starts at step 0", stacklevel=3)
        return out, None
    latest = checkpoints[-1][1]
    diffs = _compatible(json.loads((latest / STATE_FILE).read_text())["config"], cfg.to_dict())
    if diffs:
        raise RDMError(f"cannot resume {out}: the settings differ from the checkpointed run's: " + "; ".join(diffs))
    return out, latest


def make_accelerator(mixed_precision: str, cpu: bool) -> Accelerator:
    """A fresh Accelerator. accelerate keeps its settings in a process-wide singleton, so a notebook's
    second run with another precision would be refused; the per-run part is reset here (the
    distributed PartialState, set up by `accelerate launch`, is kept)."""
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then constant or cosine to zero at `steps`."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or fine-tune, or resume) a retrieval-augmented diffusion model; see the module docstring."""
    # 1. Settings, run folder, accelerator
    cfg, preset, _ = resolve_config(cfg)
    out, resume_from = _open_run(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    # 2. Database, CLIP, model
    db = Database.open(cfg.db, cfg.indexes)
    embedder = embedder_for(db, str(device))
    if cfg.clip and cfg.clip != db.identity.model and \
            not embedder.identity.same_vectors_as(load_embedder(cfg.clip, str(device)).identity):
        raise RDMError(f"--clip {cfg.clip} is not the CLIP database {db.name} was built with "
                       f"({db.identity.describe()}); omit --clip or use a database built with it")
    model = build_model(cfg, preset, embedder.dim)
    if model.vae is not None:
        model.vae.to(device)
    if cfg.adapter is not None:  # LoRA: the base weights frozen, a fresh low-rank update (seeded) trained
        from ..models.adapters import attach

        torch.manual_seed(cfg.seed)
        trainable = attach(model.unet, cfg.rank, cfg.lora_alpha, cfg.targets)
    else:
        trainable = list(model.unet.parameters())

    # 3. Training data, computed once per (source, database, CLIP, VAE, resolution) and cached
    with accelerator.main_process_first():
        source = open_source(cfg.data, split=cfg.split, image_column=cfg.image_column,
                             caption_column=cfg.caption_column)
        data = prepare_training_data(source, db, embedder, model.vae, cfg.resolution, cfg.k, cfg.dedup_threshold,
                                     cfg.cache_dir, cfg.limit, device, progress=cfg.progress and main,
                                     query=cfg.query)
    scale = model.latent_scale_factor or latent_scale_factor(data.latents, cfg.seed)
    without_caption = 0 if data.has_caption is None else int((~data.has_caption).sum())
    summary = {"images": len(data), "cache": str(data.cache), "latent_scale_factor": scale,
               "excluded_self": data.neighbours.excluded_self,
               "excluded_duplicates": data.neighbours.excluded_duplicates,
               "fewer_than_k": int((data.neighbours.counts < cfg.k).sum()),
               "query": cfg.query, "without_caption": without_caption}
    if without_caption and main:
        warnings.warn(f"{without_caption} of {len(data)} training images have no caption: their query is their "
                      f"image embedding, even with query={cfg.query!r}", stacklevel=2)

    # 4. Optimizer, schedule, EMA; accelerate wraps the U-Net for mixed precision and DDP
    unet = model.unet
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = None  # an adapter is exported as trained (as diffusers' LoRA scripts do): no EMA
    if cfg.adapter is None:
        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=cfg.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(lr_scheduler)
    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if ema is not None:
            ema.to(device)
        start = json.loads((resume_from / STATE_FILE).read_text())["step"]
    if start >= cfg.steps:
        raise RDMError(f"{out} is already trained to step {start}; pass a larger --steps to continue")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    # 5. The loop
    val = np.arange(min(cfg.num_val, len(data)))
    val_query = data.query[val] if cfg.query == "image" else data.text_query[val]  # as inference queries: text
    val_k = int(min(cfg.k, data.neighbours.counts[val].min()))
    refs = reference_images(data, val, model.vae, device) if main else None
    result = TrainResult(out=out, model_dir=out / MODEL, step=start, start_step=start, data=summary)
    global_batch = cfg.batch_size * world
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not (progress_bars(cfg.progress) and main))
    metrics = open(out / METRICS_FILE, "a") if main else None
    smoothed, timed_images, timed_seconds = None, 0, 0.0

    def write_model(step: int, samples: bool) -> None:
        """Export the EMA weights to OUT/model (main process), and a sample grid when asked."""
        if not main:
            return
        config = rdm_config_for(cfg, model, embedder, scale, db, data, step)
        if cfg.adapter is not None:
            weights = accelerator.unwrap_model(unet).eval()
            save_adapter_of_run(out / ADAPTER, weights, cfg, model, db, step)
        else:
            weights = ema_unet(accelerator.unwrap_model(unet), ema)
            save_model_folder(out / MODEL, weights, model.vae, model.scheduler, config, overwrite=True)
        if samples:
            sample_grid(weights, model.vae, model.scheduler, dataclasses.replace(config, k=val_k), val_query,
                        data.neighbour_vectors[val, :val_k], refs, out / SAMPLES / f"{checkpoint_name(step)}.png",
                        cfg.sample_steps, cfg.guidance_scale, cfg.seed, device=device)
        weights.train(cfg.adapter is not None)  # the adapter's U-Net is the one being trained

    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            data_time, loss_sum = 0.0, 0.0
            for micro in range(cfg.grad_accum):
                d0 = time.perf_counter()
                index = batch_indices(len(data), cfg.seed, step * cfg.grad_accum + micro, global_batch)
                index = index[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                batch = make_batch(data, index, step_generator(cfg.seed, step, micro, rank), scale, cfg,
                                   model.scheduler.config.num_train_timesteps, device)
                data_time += time.perf_counter() - d0
                last = micro == cfg.grad_accum - 1
                with accelerator.no_sync(unet) if not last else contextlib.nullcontext():
                    loss = diffusion_loss(unet, model.scheduler, batch, cfg.prediction_type)
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float()
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            loss_value = accelerator.gather(loss_sum[None] / cfg.grad_accum).mean().item()
            if not math.isfinite(loss_value):
                raise RDMError(f"the loss became {loss_value} at step {step + 1}; lower --lr or use "
                               "--mixed-precision no")
            elapsed = time.perf_counter() - t0
            result.losses.append(loss_value)
            result.seconds += elapsed
            result.data_seconds += data_time
            if step > start:  # the first step includes one-off warm-up costs
                timed_images += global_batch * cfg.grad_accum
                timed_seconds += elapsed
            smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            bar.update()
            done = step + 1
            if metrics:
                metrics.write(json.dumps({"step": done, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                                          "seconds": elapsed, "data_seconds": data_time}) + "\n")
            result.step = done
            if done < cfg.steps:
                checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
                samples = cfg.sample_every > 0 and done % cfg.sample_every == 0
                if checkpoint:
                    save_checkpoint(accelerator, out, done, cfg, cfg.keep_checkpoints)
                if checkpoint or samples:
                    write_model(done, samples)
    except KeyboardInterrupt:
        if result.step > start:  # keep what was done: the run resumes from here
            save_checkpoint(accelerator, out, result.step, cfg, cfg.keep_checkpoints)
        raise
    finally:
        bar.close()
        if metrics:
            metrics.close()

    # 6. Final checkpoint and model
    save_checkpoint(accelerator, out, result.step, cfg, cfg.keep_checkpoints)
    write_model(result.step, samples=cfg.sample_every >= 0)
    if cfg.adapter is not None and main:
        from ..models.adapters import publish

        result.adapter_dir = publish(out / ADAPTER, cfg.adapter)
    accelerator.wait_for_everyone()
    result.images_per_second = timed_images / timed_seconds if timed_seconds else 0.0
    accelerator.end_training()
    return result
