"""How fast does `rdm sample` run, and how much of its time is spent outside the U-Net?

    python scripts/bench_sampling.py                  # CPU: float32, and bfloat16 when the CPU has it
    python scripts/bench_sampling.py --gpu            # also the published 768x768 architecture on CUDA
    python scripts/bench_sampling.py --threads 1      # steadier figures on a shared machine
    python scripts/bench_sampling.py --full-cpu       # one U-Net call of the published architecture, fp32 vs bf16

CPU part: the golden CompVis checkpoint (the structure of the published RDM, scaled down; native
128x128) converted with a tiny random CLIP, and a database of toy-art pictures embedded by that CLIP.
Each row is a full `rdm.sampling.generate.sample` call on a loaded pipeline (50 DDIM steps, guidance 5: text
embedding, retrieval, denoising, decoding, PNG + JSON + grid writing); U-Net time is measured with
forward hooks, and "outside" is everything else. bfloat16 is compared with float32 pixel by pixel.

Full-size CPU probe (`--full-cpu`): one guided U-Net call (batch 2) of the published 768 architecture
with random weights at 768x768, float32 against bfloat16: seconds per call, the 50-step estimate, and
the relative difference of the predicted noise (about 8 GB of memory).

GPU part (`--gpu`, skipped without CUDA): the full 768 architecture with random weights, timing 50
steps at 768x768 in float16/bfloat16 with PyTorch SDPA against float32 with diffusers' classic
(non-SDPA) attention. Query and neighbours are random unit vectors, so no CLIP is needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdm import api
from rdm.demo.toyart import ToyArtSpec, generate as make_toyart
from rdm.sampling.generate import SampleOptions, convert, sample
from rdm.sampling.pipeline import RDMPipeline
from rdm.models.tiny import make_tiny_clip

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "compvis_rdm_small"
REFERENCE_768 = SHARED / "reference" / "compvis_rdm768x768.yaml"
PROMPT = "a red star, neon style"


@contextmanager
def forward_timer(module: torch.nn.Module):
    """Yield a list that collects the wall time of every forward of `module` (CUDA-synchronised)."""
    times, start = [], []
    sync = torch.cuda.synchronize if next(module.parameters()).is_cuda else (lambda: None)

    def before(*_):
        sync()
        start.append(time.perf_counter())

    def after(*_):
        sync()
        times.append(time.perf_counter() - start.pop())

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield times
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def call_timer(obj, method: str):
    """Yield a list that collects the wall time of every call of obj.method (wrapped on the instance)."""
    times, original = [], getattr(obj, method)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    setattr(obj, method, timed)
    try:
        yield times
    finally:
        delattr(obj, method)


def setup_cpu(work: Path) -> tuple[Path, Path]:
    """(model folder, databases home): the converted golden model and a toy-art database, both with a tiny CLIP."""
    clip = make_tiny_clip(work / "clip")
    make_toyart(ToyArtSpec(size=64), 96, work / "toyart")
    home = work / "indexes"
    api.build_index(str(work / "toyart"), name="toyart", clip=clip, indexes=str(home), workers=0, progress=False)
    model = convert(GOLDEN / "model.ckpt", GOLDEN / "config.yaml", clip, work / "model").path
    return model, home


def bench_cpu(model: Path, home: Path, work: Path, dtypes: list[torch.dtype], batches: list[int], steps: int,
              repeats: int) -> None:
    print(f"CPU, {torch.get_num_threads()} threads: golden-sized RDM at 128x128, {steps} DDIM steps, guidance 5, "
          f"k=4 from a {96}-item database; median of {repeats} runs after a warm-up")
    print("outside = all but the U-Net: decode (VAE decoder) + steps (scheduler.step) + other (text embedding, "
          "retrieval, guidance arithmetic, provenance, PNG/JSON/grid writing)")
    print(f"{'dtype':<10}{'images':>7}{'s/image':>9}{'U-Net s':>9}{'decode s':>9}{'steps s':>9}{'other s':>9}"
          f"{'outside %':>10}{'other %':>9}")
    outputs = {}
    for dtype in dtypes:
        pipe = RDMPipeline.from_pretrained(model, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        sample(PROMPT, databases=["toyart"], options=SampleOptions(seed=0, steps=2, progress=False),
               out=work / "warmup", indexes=str(home), pipe=pipe)  # loads the CLIP, hashes the model
        for n in batches:
            runs = []
            for r in range(repeats):
                out = work / f"out-{dtype}-{n}-{r}".replace("torch.", "")
                with forward_timer(pipe.unet) as unet_times, forward_timer(pipe.vae.decoder) as decode_times, \
                        call_timer(pipe.scheduler, "step") as step_times:
                    t0 = time.perf_counter()
                    result = sample(PROMPT, databases=["toyart"], indexes=str(home), out=out, pipe=pipe,
                                    options=SampleOptions(seed=0, steps=steps, num_images=n, progress=False))
                    total = time.perf_counter() - t0
                runs.append((total, sum(unet_times), sum(decode_times), sum(step_times)))
                outputs[(dtype, n)] = result.images
            total, unet, decode, steps_s = (statistics.median(x) for x in zip(*runs))
            other = total - unet - decode - steps_s
            print(f"{str(dtype).replace('torch.', ''):<10}{n:>7}{total / n:>9.3f}{unet:>9.3f}{decode:>9.3f}"
                  f"{steps_s:>9.3f}{other:>9.3f}{100 * (total - unet) / total:>9.1f}%{100 * other / total:>8.1f}%")
    if torch.bfloat16 in dtypes and torch.float32 in dtypes:
        n = batches[0]
        a = np.stack([np.asarray(Image.open(p), np.float64) for p in outputs[(torch.float32, n)]])
        b = np.stack([np.asarray(Image.open(p), np.float64) for p in outputs[(torch.bfloat16, n)]])
        mse = ((a - b) ** 2).mean()
        psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
        print(f"bfloat16 vs float32 (same seed, 8-bit PNGs): max |diff| {np.abs(a - b).max():.0f}/255, "
              f"mean |diff| {np.abs(a - b).mean():.2f}/255, PSNR {psnr:.1f} dB")


def bench_full_cpu(steps: int) -> None:
    if not REFERENCE_768.is_file():
        print(f"full-size CPU probe: skipped ({REFERENCE_768} not available)")
        return
    from rdm.models.convert.compvis import build_models, read_compvis_config

    params = read_compvis_config(REFERENCE_768)
    unet = build_models(params)[0].eval()  # random weights
    side, dim = params["unet_config"]["params"]["image_size"], params["unet_config"]["params"]["context_dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, params["unet_config"]["params"]["in_channels"], side, side, generator=g)  # (2B, C, h, w)
    context = torch.nn.functional.normalize(torch.randn(2, 5, dim, generator=g), dim=-1)  # (2B, 1+k, D)
    print(f"full-size CPU probe, {torch.get_num_threads()} threads: published architecture (random weights), "
          f"{side}x{side} latents, one guided U-Net call (batch 2)")
    reference = None
    for dtype in (torch.float32, torch.bfloat16):
        unet.to(dtype)
        with torch.no_grad():
            unet(x.to(dtype), 500, encoder_hidden_states=context.to(dtype))  # warm-up
            t0 = time.perf_counter()
            eps = unet(x.to(dtype), 500, encoder_hidden_states=context.to(dtype)).sample.float()
            seconds = time.perf_counter() - t0
        reference = eps if reference is None else reference
        diff = ((eps - reference).norm() / reference.norm()).item()
        print(f"  {str(dtype).replace('torch.', ''):<9} {seconds:7.2f} s/call  ~{seconds * steps / 60:5.1f} min/image "
              f"at {steps} steps  relative eps difference to float32 {diff:.4f}")


def bench_gpu(steps: int) -> None:
    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device)")
        return
    if not REFERENCE_768.is_file():
        print(f"GPU: skipped ({REFERENCE_768} not available)")
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from rdm.models.convert.compvis import build_models, native_resolution, read_compvis_config
    from rdm.models.format import RDMConfig

    params = read_compvis_config(REFERENCE_768)
    unet, vae, scheduler = build_models(params, device="cuda")  # random weights
    dim = params["unet_config"]["params"]["context_dim"]
    config = RDMConfig(embedder={"model": "ViT-L-14:openai", "dim": dim}, embedding_dim=dim,
                       resolution=native_resolution(params), latent_scale_factor=float(params["scale_factor"]),
                       latent_channels=params["unet_config"]["params"]["in_channels"])
    pipe = RDMPipeline(unet=unet, vae=vae, scheduler=scheduler, rdm_config=config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(1, dim, generator=g), dim=-1)
    neighbours = torch.nn.functional.normalize(torch.randn(1, 4, dim, generator=g), dim=-1)
    print(f"GPU {torch.cuda.get_device_name()}: published 768 architecture (random weights), {config.resolution}px, "
          f"{steps} DDIM steps, guidance 5, batch 1")
    print(f"{'variant':<26}{'s/image':>10}{'U-Net s':>10}{'outside %':>11}{'peak GiB':>10}")
    for name, dtype, processor in (("float32, classic attention", torch.float32, AttnProcessor()),
                                   ("float32, SDPA", torch.float32, AttnProcessor2_0()),
                                   ("bfloat16, SDPA", torch.bfloat16, AttnProcessor2_0()),
                                   ("float16, SDPA", torch.float16, AttnProcessor2_0())):
        pipe.to(dtype=dtype)
        pipe.unet.set_attn_processor(processor)
        pipe.vae.set_attn_processor(processor)
        def run(steps: int):
            return pipe(query_embeds=query, neighbor_embeds=neighbours, seed=0, num_inference_steps=steps)

        run(2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with forward_timer(pipe.unet) as unet_times:
            t0 = time.perf_counter()
            run(steps)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
        unet_s = sum(unet_times)
        print(f"{name:<26}{total:>10.3f}{unet_s:>10.3f}{100 * (total - unet_s) / total:>10.1f}%"
              f"{torch.cuda.max_memory_allocated() / 2**30:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="float32 only")
    parser.add_argument("--gpu", action="store_true", help="also benchmark the 768 architecture on CUDA")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--full-cpu", action="store_true", help="also probe the published architecture on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); 1 is "
                        "steadier when other processes share the cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gpu_only:
        if not GOLDEN.is_dir():
            raise SystemExit(f"needs the golden checkpoint at {GOLDEN}")
        bf16 = not args.no_bf16 and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model, home = setup_cpu(work)
            bench_cpu(model, home, work, [torch.float32] + [torch.bfloat16] * bf16, args.batches, args.steps,
                      args.repeats)
    if args.full_cpu and not args.gpu_only:
        bench_full_cpu(args.steps)
    if args.gpu or args.gpu_only:
        bench_gpu(args.steps)


if __name__ == "__main__":
    main()
