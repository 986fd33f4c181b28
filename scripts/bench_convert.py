"""Convert a full-size random CompVis RDM checkpoint and report the time and peak memory it takes.

    python scripts/bench_convert.py ../shared/reference/compvis_rdm768x768.yaml [--work DIR] [--keep]

1. The checkpoint: every tensor of `rdm.models.convert.compvis.compvis_layout(config)` (schedule buffers,
   U-Net, its EMA copies, autoencoder: the layout of CompVis' published 768x768 model), random, plus
   Lightning's bookkeeping, written with torch.save. Each tensor lives in its own memory-mapped
   scratch file while it is written, so writing ~11 GB does not need ~11 GB of memory.
2. The conversion runs in a fresh process exactly as `rdm convert` does (the CLIP is recorded by id:
   its weights need not be here), and reports its peak resident memory (ru_maxrss, which counts the
   checkpoint's mapped pages the conversion reads).
3. A table: sizes, seconds, peak RSS, and peak RSS / the model's float32 size (the goal: <= 1.5).
Needs about twice the checkpoint's size of free disk in --work (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from rdm.sampling.generate import convert
started = time.perf_counter()
result = convert(sys.argv[1], sys.argv[2], "ViT-L-14:openai", sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "note": result.note}))
"""


def write_checkpoint(config: Path, out: Path, scratch: Path) -> dict:
    """A random checkpoint of `config`'s CompVis layout at `out`; returns the parameter counts."""
    import torch

    from rdm.models.convert.compvis import UNET_PREFIX, VAE_PREFIX, compvis_layout, read_compvis_config

    params = read_compvis_config(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i, (key, (shape, dtype)) in enumerate(compvis_layout(params).items()):
        numel = math.prod(shape)
        if numel >= 1 << 16:  # large tensors: backed by a scratch file, not by anonymous memory
            t = torch.from_file(str(scratch / f"{i}.bin"), shared=True, size=numel, dtype=dtype).view(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        if dtype.is_floating_point:
            t.uniform_(-0.02, 0.02, generator=generator)
        else:
            t.zero_()
        state[key] = t
    steps = params.get("timesteps", 1000)
    betas = torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    state["betas"] = betas.float()  # the converter checks the schedule against the config
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    checkpoint = {"state_dict": state, "global_step": 0, "epoch": 0, "pytorch-lightning_version": "1.4.2",
                  "optimizer_states": [], "lr_schedulers": []}
    torch.save(checkpoint, out)
    counts = {"unet": sum(v.numel() for k, v in state.items() if k.startswith(UNET_PREFIX)),
              "vae": sum(v.numel() for k, v in state.items() if k.startswith(VAE_PREFIX))}
    del state, checkpoint
    return counts


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a CompVis RDM config.yaml (compvis_rdm768x768.yaml)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and the model")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the converted model")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, model, scratch = work / "model.ckpt", work / "model", work / "scratch"
    try:
        # 1. The checkpoint, in a child process so that its memory is gone before the conversion
        scratch.mkdir(exist_ok=True)
        started = time.perf_counter()
        writer = subprocess.run([sys.executable, __file__, "--write", str(args.config), str(ckpt), str(scratch)],
                                check=True, capture_output=True, text=True)
        counts = json.loads(writer.stdout.strip().splitlines()[-1])
        write_seconds = time.perf_counter() - started
        shutil.rmtree(scratch)

        # 2. The conversion, as `rdm convert` runs it
        shutil.rmtree(model, ignore_errors=True)
        run = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(args.config), str(model)], check=True,
                             capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        result = json.loads(run.stdout.strip().splitlines()[-1])

        # 3. The table
        fp32 = 4 * (counts["unet"] + counts["vae"])
        ratio = result["peak_rss_bytes"] / fp32
        rows = [("U-Net + autoencoder parameters", f"{counts['unet']:,} + {counts['vae']:,}"),
                ("float32 model size", gib(fp32)),
                ("checkpoint (with EMA copies)", gib(ckpt.stat().st_size)),
                ("converted folder", gib(sum(f.stat().st_size for f in model.rglob("*") if f.is_file()))),
                ("writing the checkpoint", f"{write_seconds:.0f} s"),
                ("conversion (incl. sha256 of both files)", f"{result['seconds']:.0f} s"),
                ("conversion peak RSS", gib(result["peak_rss_bytes"])),
                ("peak RSS / float32 size", f"{ratio:.2f} (goal <= 1.5)")]
        width = max(len(r[0]) for r in rows)
        print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
        for name, value in rows:
            print(f"| {name:<{width}} | {value} |")
        sys.exit(0 if ratio <= 1.5 else 1)
    finally:
        if not args.keep:
            for p in (ckpt, model, scratch):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--write":
        print(json.dumps(write_checkpoint(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        main()
