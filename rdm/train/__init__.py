"""Training retrieval-augmented diffusion models: `rdm train` and `rdm train-vae`.

    from rdm.train import TrainConfig, train
    result = train(TrainConfig(data="toyart/", db="toyart", out="runs/toy", preset="small",
                               mixed_precision="bf16"))
    result.model_dir          # an rdm model folder: RDMPipeline.from_pretrained(result.model_dir)

    rdm train --data toyart/ --db toyart --out runs/toy --preset small --mixed-precision bf16
    accelerate launch -m rdm.cli train ...       # the same command on several GPUs

Modules, in the order the data flow: `presets` (model sizes as JSON: configs/*.json), `data` (crops,
CLIP queries, latents and mined neighbours, cached), `loop` (the accelerate training loop,
checkpoints, resume, sample grids), `vae` (the autoencoder trainer for latent-space presets).

The demo preset `small` trains in pixel space. Measured with scripts/bench_train.py (2 shared CPU
cores, 1 thread, batch 16, 128-d CLIP): the 64x64x3 U-Net trains at 11 images/s in float32 and 19
with bf16 autocast; the 16x16x4 latent U-Net (`small-latent`) at 44 / 55, but its autoencoder has
to be trained first (21 images/s) and after 500 steps (8 minutes) it still shifts colours and
blurs away the dotted, striped and mosaic textures that tell the toy-art styles apart.
"""

import importlib

from .config import TrainConfig, VAETrainConfig

_LAZY = {"TrainResult": "loop", "list_checkpoints": "loop", "train": "loop", "VAETrainResult": "vae", "train_vae": "vae",
         "Preset": "presets", "list_presets": "presets", "load_preset": "presets", "MinedNeighbours": "data",
         "TrainingData": "data", "mine_neighbours": "data", "prepare_training_data": "data"}


def __getattr__(name: str):
    """The trainers import torch, accelerate and diffusers (seconds): loaded on first use (PEP 562), so that the
    configs alone (what the CLI reads its defaults from) import at once."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainResult", "train", "list_checkpoints", "VAETrainConfig", "VAETrainResult",
           "train_vae", "Preset", "list_presets", "load_preset", "MinedNeighbours", "TrainingData", "mine_neighbours",
           "prepare_training_data"]
