"""Image-to-image at strength S skips the first (1 - S) of the steps: does it cost about S of a text-to-image run?

    python scripts/bench_img2img.py                     # the bundled demo model, 50 DDIM steps, CPU
    python scripts/bench_img2img.py --steps 25 --repeats 5 --device cuda

Each row is a full pipeline call (query embedding, neighbours, denoising, decoding) on a loaded pipeline with the
same seed, query and neighbours (eight toy-art --ref images); text-to-image is the baseline, measured in the same
run. U-Net calls are counted with a forward hook; seconds are the median of --repeats calls after a warm-up, taken round-robin.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from rdm.demo.run import DEMO_MODEL
from rdm.demo.toyart import ToyArtSpec, sample_item
from rdm.sampling.pipeline import RDMPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import cpu_name  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = RDMPipeline.from_pretrained(a.model).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    spec = ToyArtSpec(styles=("striped",))
    refs = [sample_item(spec, 78_000_000 + i)[0] for i in range(8)]
    photo = sample_item(ToyArtSpec(styles=("flat",)), 78_100_000)[0]
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def run(strength):
        kwargs = {} if strength is None else {"init_image": photo, "strength": strength}
        calls.clear()
        sync()
        t = time.perf_counter()
        pipe(prompt="a red star", refs=refs, num_inference_steps=a.steps, seed=0, **kwargs)
        sync()
        return time.perf_counter() - t, len(calls)

    settings = [None] + a.strengths
    for strength in settings:
        run(strength)  # warm-up
    times = {i: [] for i in range(len(settings))}
    calls_of = {}
    for _ in range(a.repeats):  # round-robin, so that drift in the machine's speed hits every row alike
        for i, strength in enumerate(settings):
            seconds, calls_of[i] = run(strength)
            times[i].append(seconds)
    rows = [(strength, calls_of[i], statistics.median(times[i])) for i, strength in enumerate(settings)]
    base = rows[0][2]
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu_name()
    print(f"{a.model} | {a.steps} DDIM steps | {device} | {torch.get_num_threads()} threads | median of {a.repeats}")
    print("| run | U-Net calls | seconds | vs text-to-image | strength |")
    print("|---|---:|---:|---:|---:|")
    for strength, n_calls, seconds in rows:
        label = "text-to-image" if strength is None else f"image-to-image, strength {strength:g}"
        print(f"| {label} | {n_calls} | {seconds:.3f} | {seconds / base:.2f}x | "
              f"{'' if strength is None else f'{strength:g}'} |")


if __name__ == "__main__":
    main()
