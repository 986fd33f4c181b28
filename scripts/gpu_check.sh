#!/usr/bin/env bash
# One check of everything rdm does on a GPU, printed as one table (<= 8 minutes on one CUDA GPU).
#
#   scripts/gpu_check.sh            # from the repository root, with the virtualenv active
#
# Rows: the golden CompVis model on CUDA against the original code's outputs (fp32), DDIM sampling
# in fp16 and bf16 deterministic per seed, the published 768x768 architecture sampling 50 steps
# (scripts/bench_sampling.py --gpu-only: fp16 with SDPA against fp32 classic attention), the
# throughput of a ViT-L-14 image encoder (random weights: the compute of the real one, nothing to
# download), and FAISS on the GPU when faiss has GPU support. Without CUDA the GPU rows say
# "skipped" and the CPU-safe rows (encoder throughput on the CPU, FAISS) still run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python - <<'PY'
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

rows = []  # (check, result)
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
rows.append(("device", torch.cuda.get_device_name(0) if cuda else "no CUDA: GPU rows skipped"))
golden = Path("../shared/golden/compvis_rdm_small")


def golden_on_cuda():
    """The converted golden model's U-Net on CUDA (fp32, TF32 off) against the original code's eps."""
    from safetensors.torch import load_file

    from rdm.models.convert.compvis import convert_compvis_checkpoint
    from rdm.models.format import load_model_components

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = load_file(str(golden / "golden.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_compvis_checkpoint(golden / "model.ckpt", golden / "config.yaml", Path(tmp) / "m", clip_dim=32)
        unet, vae, scheduler, config, _ = load_model_components(folder, device=device)
    with torch.no_grad():
        eps = unet(ref["unet_x"].to(device), ref["unet_t"].to(device),
                   encoder_hidden_states=ref["unet_context"].to(device)).sample.cpu()
    err = (eps - ref["unet_eps"]).abs().max().item()
    rows.append(("golden U-Net on CUDA, fp32: max |eps - original|", f"{err:.2e} ({'ok' if err < 1e-4 else 'FAIL'}, tol 1e-4)"))
    for dtype in (torch.float16, torch.bfloat16):
        runs = [ddim(unet.to(dtype), scheduler, dtype, seed=7) for _ in range(2)]
        other = ddim(unet, scheduler, dtype, seed=8)
        same = torch.equal(runs[0], runs[1])
        rows.append((f"DDIM 10 steps {str(dtype)[6:]}: same seed twice identical, other seed differs",
                     "ok" if same and not torch.equal(runs[0], other) else "FAIL"))
    unet.float()


def ddim(unet, scheduler, dtype, seed, steps=10, guidance=5.0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn((2, 16, 8, 8), generator=g, device=device)
    context = torch.nn.functional.normalize(torch.randn((2, 5, 32), generator=g, device=device), dim=-1)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = torch.cat([torch.zeros_like(context), context]).to(dtype)
            eps_u, eps_c = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=both).sample.float().chunk(2)
            x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x.cpu()


def encoder_throughput():
    """Images per second of a ViT-L-14 image tower (random weights), fp16 on CUDA, fp32 on the CPU."""
    import open_clip

    model = open_clip.create_model("ViT-L-14", pretrained=None).visual.eval().to(device)
    dtype, batch, reps = (torch.float16, 128, 5) if cuda else (torch.float32, 4, 2)
    model = model.to(dtype)
    x = torch.randn((batch, 3, 224, 224), device=device, dtype=dtype)
    with torch.inference_mode():
        model(x)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(reps):
            model(x)
        if cuda:
            torch.cuda.synchronize()
    rate = batch * reps / (time.perf_counter() - started)
    rows.append((f"ViT-L-14 image encoder, {str(dtype)[6:]}, batch {batch}, {device.type}", f"{rate:.1f} images/s"))


def faiss_gpu():
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rows.append(("FAISS on the GPU", f"{gpus} GPU(s) visible to faiss" if gpus else
                 "faiss has no GPU support here (faiss-cpu; rdm searches on the CPU, no gpu extra)"))


def sampling_768():
    run = subprocess.run([sys.executable, "scripts/bench_sampling.py", "--gpu-only"], capture_output=True, text=True,
                         timeout=360)
    lines = [l for l in (run.stdout + run.stderr).splitlines() if l.strip()]
    rows.append(("768x768, 50 steps (scripts/bench_sampling.py --gpu-only)",
                 " / ".join(lines[-4:]) if run.returncode == 0 else f"FAIL (exit {run.returncode}): {lines[-1:]}"))


GPU_ONLY = {golden_on_cuda: "golden U-Net on CUDA; fp16/bf16 DDIM deterministic per seed",
            sampling_768: "768x768, 50 steps: fp16 + SDPA vs fp32 classic attention"}
for check, label in GPU_ONLY.items():
    if not cuda:
        rows.append((label, "skipped (no CUDA)"))
        continue
    try:
        check()
    except Exception as e:  # one failed row must not hide the others
        rows.append((check.__name__, f"FAIL: {type(e).__name__}: {e}"))
for check in (encoder_throughput, faiss_gpu):
    try:
        check()
    except Exception as e:
        rows.append((check.__name__, f"FAIL: {type(e).__name__}: {e}"))

width = max(len(r[0]) for r in rows)
print(f"| {'check':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
for name, result in rows:
    print(f"| {name:<{width}} | {result} |")
sys.exit(1 if any("FAIL" in r for _, r in rows) else 0)
PY
