"""What `rdm train` and `rdm train-vae` are asked to do: every setting and its default, defined once (the CLI takes its
defaults from here). Light to import: no torch, no accelerate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Everything `rdm train` does; None fields take the preset's value (or the --init model's)."""

    data: str  # training images: a folder, a dataset (hf:ORG/NAME, saved or parquet folder), see rdm.sources
    db: str  # retrieval database (name in `indexes`, or folder) whose items become the neighbours
    out: str  # run folder: model/, checkpoints/, samples/, train_config.json, metrics.jsonl
    preset: str = "small"  # tiny, small, base, or a preset JSON file (rdm/train/configs/*.json)
    init: str | None = None  # fine-tune this rdm model folder instead of a fresh U-Net from the preset
    vae: str | None = None  # AutoencoderKL folder, or "none" for pixel space; None: the preset's/init's choice
    clip: str | None = None  # CLIP id; must be the database's (default: the one the database records)
    indexes: str | None = None  # home of the databases (default $RDM_INDEXES or ./indexes)
    resolution: int | None = None  # image side in pixels (default: preset / init model)
    k: int | None = None  # neighbours per image, the model's default k (default: preset / init model)
    query: str | None = None  # query token: "image" (own CLIP embedding), "text" (caption's), "mixed" (default:
    #                           the preset's, else "image"); text needs captions (module docstring, step 3)
    steps: int | None = None  # total optimizer steps of the run (a resume continues up to it)
    batch_size: int | None = None  # images per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # AdamW learning rate after warm-up
    lr_schedule: str = "constant"  # "constant" or "cosine" (to zero at `steps`), both after linear warm-up
    warmup_steps: int | None = None  # linear learning-rate warm-up
    weight_decay: float = 0.01  # AdamW weight decay (torch's default, as LDM)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    mixed_precision: str = "no"  # "no", "bf16" (CPU with AVX512-BF16/AMX, Ampere+ GPUs) or "fp16" (GPU)
    ema_decay: float | None = None  # EMA decay ceiling; the decay warms up as (1 + n) / (10 + n) (LitEma)
    cond_drop: float = 0.1  # probability of an all-zeros context (classifier-free guidance)
    random_k: bool = True  # each image keeps a random k' in [1, k] of its neighbours (masked); False: all k
    dedup_threshold: float = 0.95  # database items at least this similar to a training image are not neighbours
    prediction_type: str | None = None  # "epsilon" or "v_prediction" (default: the --init model's, else the preset's,
    #                                     else epsilon); fine-tuning may change it (the schedule changes with it)
    noise_schedule: str | None = None  # NOISE_SCHEDULES name (default: the --init model's, else the preset's, else ldm)
    zero_snr: bool | None = None  # rescale the betas to zero terminal SNR (Lin et al. 2024), needs v_prediction
    #                               (default: the --init model's, else the preset's, else False)
    timestep_spacing: str | None = None  # sampling timesteps: leading (CompVis), trailing (starts at t = T, with
    #                                      zero_snr), linspace (default: the --init model's, else the preset's)
    neighbour_drop: float = 0.0  # probability of zeroing the neighbour slots alone (the --style-scale context)
    checkpoint_every: int | None = None  # save a resumable checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    sample_every: int | None = None  # write a sample grid every N steps (0: only at the end; -1: never)
    num_val: int = 4  # validation queries (the first training images) in the sample grids
    sample_steps: int = 25  # DDIM steps for the sample grids
    guidance_scale: float = 3.0  # classifier-free guidance of the sample grids
    resume: bool = False  # continue from the latest checkpoint in `out` (starts afresh when there is none)
    seed: int = 0  # model initialisation, data order and all training noise
    limit: int | None = None  # use only the first N training images
    split: str = "train"  # dataset split (Hugging Face sources)
    image_column: str | None = None  # image column (Hugging Face sources)
    caption_column: str | None = None  # caption column for text queries (Hugging Face sources; default: detected)
    cache_dir: str | None = None  # training-data cache (default $RDM_CACHE/train or ~/.cache/rdm/train)
    cpu: bool = False  # train on the CPU even when a GPU is present
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is fastest on a busy shared CPU
    progress: bool = True  # tqdm progress bars
    # LoRA adapter (rdm.models.adapters): train low-rank updates of the --init model (default: the installed model for the
    # database's CLIP) instead of every weight; the adapter lands in $RDM_ADAPTERS/NAME (OUT/adapter while training)
    adapter: str | None = None  # the adapter's name; None trains the whole U-Net
    rank: int = 4  # LoRA rank r
    lora_alpha: float | None = None  # LoRA alpha (the update is scaled by alpha / r); None: = rank
    targets: str = "cross-attention"  # rdm.models.adapters.TARGETS: cross-attention, attention, or all

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VAETrainConfig:
    """Everything `rdm train-vae` does; None fields take the preset's `vae.train` value."""

    data: str  # training images (folder or dataset, see rdm.sources)
    out: str  # output folder: AutoencoderKL.save_pretrained layout + train_vae.json
    preset: str = "small-latent"  # architecture from the preset's "vae" section (or a preset JSON file)
    resolution: int | None = None  # crop side in pixels (default: the preset's resolution)
    steps: int | None = None  # optimizer steps
    batch_size: int | None = None  # images per step (per process)
    lr: float | None = None  # Adam learning rate
    kl_weight: float | None = None  # weight of the KL term (LDM: 1e-6)
    loss: str = "l1"  # reconstruction loss: "l1" or "l2"
    hflip: bool = True  # random horizontal flips
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    seed: int = 0  # initialisation, data order and posterior samples
    limit: int | None = None  # use only the first N images
    split: str = "train"  # dataset split (Hugging Face sources)
    image_column: str | None = None  # image column (Hugging Face sources)
    overwrite: bool = False  # replace an existing output folder
    cpu: bool = False  # train on the CPU even when a GPU is present
    threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True  # tqdm progress bar


__all__ = ["TrainConfig", "VAETrainConfig"]
