"""Training throughput of the demo presets: images/s, fp32 vs bf16 mixed precision, share of time in data.

    python scripts/bench_train.py                      # CPU (and the GPU too when there is one)
    python scripts/bench_train.py --steps 12 --batch-size 32 --threads 2

Builds a throw-away toy-art set (64x64), a random tiny CLIP whose embeddings have the width of the
demo CLIP's (rdm.demo.clip, so cross-attention costs what it will in the demo) and a database, then times
`rdm.train.train` itself (the first step, with its one-off costs, is not counted) for:

  small          pixel space, 64x64x3 U-Net input (the demo preset)
  small-latent   16x16x4 latents of the small f=4 autoencoder (the alternative)

and, for the latent alternative, what it costs on top: training the autoencoder (images/s) and
decoding samples. Prints one table; nothing is kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from rdm import api
from rdm.demo.clip import DEMO_CLIP_CFG
from rdm.demo.toyart import ToyArtSpec, generate
from rdm.models.tiny import TINY_CLIP_CFG, make_tiny_clip
from rdm.train import TrainConfig, VAETrainConfig, load_preset, train, train_vae

CLIP_DIM = DEMO_CLIP_CFG["embed_dim"]  # the demo CLIP's embedding width: the U-Net's cross-attention width


def setup(root: Path, images: int) -> dict:
    """Toy-art folder, tiny CLIP of the demo CLIP's width, database: what `rdm train` needs."""
    data = generate(ToyArtSpec(size=64, seed=0), images, root / "toyart")
    clip = make_tiny_clip(root / "clip", model_cfg=dict(TINY_CLIP_CFG, embed_dim=CLIP_DIM))
    api.build_index(str(data), name="toyart", clip=clip, indexes=str(root / "indexes"), workers=0, progress=False)
    return {"data": str(data), "db": "toyart", "indexes": str(root / "indexes"), "cache_dir": str(root / "cache")}


def time_training(env: dict, root: Path, preset: str, vae: str | None, precision: str, steps: int, batch: int,
                  cpu: bool) -> dict:
    """images/s and data share of `steps` optimizer steps (first excluded)."""
    out = root / f"run-{preset}-{precision}-{'cpu' if cpu else 'gpu'}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(**env, out=str(out), preset=preset, vae=vae, steps=steps, batch_size=batch,
                      mixed_precision=precision, sample_every=-1, checkpoint_every=0, progress=False, cpu=cpu)
    r = train(cfg)
    return {"images_per_s": r.images_per_second, "data_share": r.data_seconds / r.seconds}


def time_decode(vae_dir: str, batch: int, device: str) -> float:
    """Seconds to decode `batch` 16x16x4 latents to 64x64 images (once per sample, after all steps)."""
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    z = torch.randn(batch, 4, 16, 16, device=device)
    with torch.no_grad():
        vae.decode(z)
        t0 = time.perf_counter()
        vae.decode(z)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per measurement (first not counted)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="toy-art images to train on")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [("cpu", True)] + ([("cuda", False)] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        env = setup(root, args.images)
        setup_s = time.perf_counter() - t0
        vae_dir = str(root / "vae")
        t0 = time.perf_counter()
        vae_steps = 6
        train_vae(VAETrainConfig(data=env["data"], out=vae_dir, preset="small-latent", steps=vae_steps,
                                 batch_size=args.batch_size, progress=False, cpu=True))
        vae_ips = vae_steps * args.batch_size / (time.perf_counter() - t0)
        for device, cpu in devices:
            precisions = ["no", "bf16"] + (["fp16"] if device == "cuda" else [])
            for preset, vae in (("small", None), ("small-latent", vae_dir)):
                for precision in precisions:
                    m = time_training(env, root, preset, vae, precision, args.steps, args.batch_size, cpu)
                    rows.append((device, preset, precision, m))
                    print(f"  measured {device} {preset} {precision}: {m['images_per_s']:.1f} images/s", flush=True)
        decode_s = time_decode(vae_dir, args.batch_size, "cpu")

    print(f"\nrdm train throughput  (torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, {args.steps - 1} timed steps, CLIP dim {CLIP_DIM}; setup {setup_s:.0f} s)")
    print(f"{'device':<7}{'preset':<14}{'input':<10}{'params':>8}{'precision':>11}{'images/s':>10}{'data %':>8}")
    for device, preset, precision, m in rows:
        p = load_preset(preset)
        shape = "64x64x3" if p.space == "pixel" else "16x16x4"
        params = sum(x.numel() for x in p.unet_model(3 if p.space == "pixel" else 4, 64 if p.space == "pixel" else 16,
                                                       CLIP_DIM).parameters()) / 1e6
        print(f"{device:<7}{preset:<14}{shape:<10}{params:>7.1f}M{precision:>11}{m['images_per_s']:>10.1f}"
              f"{100 * m['data_share']:>7.1f}%")
    print(f"\nsmall-latent extra costs on cpu: autoencoder training {vae_ips:.1f} images/s (fp32); decoding "
          f"{args.batch_size} samples {decode_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
