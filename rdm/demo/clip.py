"""The demo CLIP: a small open_clip model trained on toy-art image/caption pairs.

Built from open_clip's own parts (`open_clip.CLIP` from a model_cfg, the default tokenizer, `ClipLoss`,
open_clip's weight-decay split and logit-scale clamp from `open_clip_train/main.py` and `train.py`)
and saved in open_clip's `local-dir:` format, so `rdm.embed.embedder.Embedder.load('local-dir:PATH')` loads
it like any other CLIP. The demo asks two things of it, and `evaluate_clip` measures both:

* image vectors whose nearest neighbours share the *style*, so a per-style database hands the U-Net
  that style;
* text vectors of content-only prompts ("a red star") that retrieve the prompted shape and colour
  from any style's database.

Training data is rendered on the fly: step s sees toy-art items s * B .. (s + 1) * B - 1 of
`ToyArtSpec(seed=data_seed)`, so a run is a pure function of its config, whatever the worker count.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save as safetensors_bytes
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from ..embed.embedder import Embedder
from ..errors import RDMError
from ..util.files import atomic_write
from .toyart import COLOURS, SHAPES, STYLES, ToyArtSpec, make_caption, sample_item

DEMO_CLIP_CFG = {  # open_clip model_cfg: 64 px ViT, narrow text tower (49408 x 64 tokens); 5.3 M params, 10.6 MB fp16
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 160, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
DEMO_PREPROCESS_CFG = {  # open_clip preprocess_cfg: the OpenAI mean/std, no resizing at 64 px
    "size": 64, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
    "fill_color": 0,
}
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
TRAIN_INFO_FILE = "train_info.json"  # what built the folder: the training config, losses and evaluation
EVAL_START = 10_000_000  # toy-art indices from here on are never trained on (training uses 0 .. steps * B - 1)


@dataclass
class ClipTrainConfig:
    """How to train the demo CLIP; the result is a pure function of these fields."""

    steps: int = 5000  # optimiser steps
    batch_size: int = 256  # image/caption pairs per step (ClipLoss negatives come from the same batch)
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW decay, on weight matrices and embeddings only
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (open_clip's ViT recipe)
    eps: float = 1e-6  # AdamW epsilon
    warmup: int = 250  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # max gradient norm (0 disables)
    seed: int = 0  # torch seed for the initial weights
    data_seed: int = 0  # ToyArtSpec seed of the training images
    style_caption_prob: float = 0.5  # chance that a training caption names the style (toy-art default)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA or CPUs with native bf16, else fp32), "bf16", "fp32"
    workers: int = 0  # DataLoader worker processes rendering images (0: render in the main process)
    save_dtype: str = "float16"  # dtype of the saved weights: "float16" (half the file) or "float32"
    log_every: int = 50  # steps between log lines
    probe_every: int = 500  # steps between zero-shot probes on held-out images (0: never)
    probe_size: int = 240  # held-out images per probe
    model_cfg: dict = field(default_factory=lambda: json.loads(json.dumps(DEMO_CLIP_CFG)))  # open_clip model_cfg

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise RDMError(f"the demo CLIP needs steps >= 1 and batch_size >= 2 (ClipLoss needs negatives), got "
                           f"steps={self.steps}, batch_size={self.batch_size}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise RDMError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.save_dtype not in ("float16", "float32"):
            raise RDMError(f"save_dtype must be float16 or float32, got {self.save_dtype!r}")


@dataclass
class ClipTrainResult:
    """What a training run produced."""

    path: Path | None  # the saved model folder (None when not saved)
    model_id: str | None  # 'local-dir:PATH' for Embedder.load
    losses: list[float]  # ClipLoss of every step
    seconds: float  # wall time of the training loop
    images_per_second: float  # training pairs per second, rendering included
    metrics: dict = field(default_factory=dict)  # evaluate_clip's figures, when evaluated
    probes: list[dict] = field(default_factory=list)  # {step, shape, colour, style} zero-shot accuracies

    def loss_summary(self, points: int = 8) -> list[tuple[int, float]]:
        """(step, mean loss of the window ending there) at `points` evenly spaced steps."""
        n = len(self.losses)
        window = max(1, n // (points * 2))
        ends = sorted({max(window, round(n * (i + 1) / points)) for i in range(points)})
        return [(end, float(np.mean(self.losses[end - window:end]))) for end in ends]


# ---------------------------------------------------------------- data


class ToyArtPairs(Dataset):
    """Items start .. start + length - 1 of a toy-art set as (uint8 (H, W, 3) array, caption)."""

    def __init__(self, spec: ToyArtSpec, start: int, length: int):
        self.spec, self.start, self.length = spec, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        image, labels = sample_item(self.spec, self.start + i)
        return np.asarray(image, dtype=np.uint8), labels["caption"]


def collate_pairs(batch: list[tuple[np.ndarray, str]]) -> tuple[torch.Tensor, list[str]]:
    """[(pixels, caption)] -> (uint8 (B, H, W, 3), captions)."""
    return torch.from_numpy(np.stack([pixels for pixels, _ in batch])), [caption for _, caption in batch]


def normalise(pixels: torch.Tensor, preprocess_cfg: dict = DEMO_PREPROCESS_CFG) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) standardised exactly as the embedder does it."""
    mean = torch.tensor(preprocess_cfg["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


# ---------------------------------------------------------------- training


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting: bf16 where the hardware runs it natively, else None (fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if device.type == "cpu" and native else None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no decay on gains, biases, norms and logit_scale (open_clip_train/main.py `exclude`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip_train/scheduler.py `cosine_lr`)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def attention_backend(device: torch.device):
    """Math attention on CPU: torch's CPU flash kernel is 1.6-3x slower here (65 tokens, 32-wide heads, bf16)."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()


def build_model(model_cfg: dict, seed: int) -> open_clip.CLIP:
    """An open_clip CLIP with random weights from torch seed `seed`, returning dicts from forward()."""
    torch.manual_seed(seed)
    return open_clip.CLIP(**json.loads(json.dumps(model_cfg)), output_dict=True)


class ZeroShotProbe:
    """A quick zero-shot check during training: held-out images against all 384 full captions."""

    def __init__(self, spec: ToyArtSpec, n: int, tokenizer, device: torch.device):
        images, self.labels = render_set(spec, EVAL_START, n)
        self.pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).to(device)  # (n, H, W, 3)
        self.captions = [(sh, co, st) for st in STYLES for sh in SHAPES for co in COLOURS]
        self.tokens = tokenizer([make_caption(sh, co, st) for sh, co, st in self.captions]).to(device)

    @torch.no_grad()
    def __call__(self, model: open_clip.CLIP) -> dict[str, float]:
        was_training = model.training
        model.eval()
        image = model.encode_image(normalise(self.pixels), normalize=True)  # (n, D)
        text = model.encode_text(self.tokens, normalize=True)  # (384, D)
        model.train(was_training)
        pred = [self.captions[i] for i in (image @ text.T).argmax(dim=1).tolist()]
        return {key: float(np.mean([p[j] == lab[key] for p, lab in zip(pred, self.labels)]))
                for j, key in enumerate(("shape", "colour", "style"))}


def train_clip(config: ClipTrainConfig, out: str | Path | None = None, evaluate: bool = True,
               log: Callable[[str], None] | None = None) -> ClipTrainResult:
    """Train the demo CLIP on rendered toy art with ClipLoss; save it to `out` (and evaluate it) when given."""
    # 1. Model, tokenizer, loss, optimiser
    device = torch.device(config.device)
    model = build_model(config.model_cfg, config.seed).to(device).train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config.model_cfg["text_cfg"]["context_length"])
    loss_fn = ClipLoss()
    optimiser = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    amp = autocast_dtype(config.precision, device)

    # 2. Data: step s renders items s * B .. (s + 1) * B - 1
    spec = ToyArtSpec(size=config.model_cfg["vision_cfg"]["image_size"], seed=config.data_seed,
                      style_caption_prob=config.style_caption_prob)
    loader = DataLoader(ToyArtPairs(spec, 0, config.steps * config.batch_size), batch_size=config.batch_size,
                        shuffle=False, drop_last=True, num_workers=config.workers, collate_fn=collate_pairs,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if config.workers else None)

    # 3. Training loop, with a zero-shot probe now and then
    probe = ZeroShotProbe(spec, config.probe_size, tokenizer, device) if config.probe_every else None
    losses: list[float] = []
    probes: list[dict] = []
    start = time.perf_counter()
    for step, (pixels, captions) in enumerate(loader):
        lr = cosine_lr(step, config.lr, config.warmup, config.steps)
        for group in optimiser.param_groups:
            group["lr"] = lr
        images = normalise(pixels.to(device, non_blocking=True))  # (B, 3, H, W)
        tokens = tokenizer(captions).to(device, non_blocking=True)  # (B, context_length)
        with attention_backend(device), torch.autocast(device.type, dtype=amp or torch.float32,
                                                       enabled=amp is not None):
            out_dict = model(images, tokens)
        loss = loss_fn(out_dict["image_features"].float(), out_dict["text_features"].float(),
                       out_dict["logit_scale"].float())
        if not torch.isfinite(loss):
            raise RDMError(f"the demo CLIP's loss became {loss.item()} at step {step}; lower --lr or use fp32")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # open_clip_train/train.py
        losses.append(loss.item())
        if log and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
            window = losses[-config.log_every:]
            log(f"step {step + 1}/{config.steps}  loss {np.mean(window):.4f}  lr {lr:.2e}  "
                f"scale {model.logit_scale.exp().item():.1f}  {rate:.0f} img/s")
        if probe and ((step + 1) % config.probe_every == 0 or step + 1 == config.steps):
            probes.append({"step": step + 1, **probe(model)})
            if log:
                log("  zero-shot probe: " + ", ".join(f"{k} {v:.3f}" for k, v in probes[-1].items() if k != "step"))
    seconds = time.perf_counter() - start
    result = ClipTrainResult(None, None, losses, seconds, len(losses) * config.batch_size / max(seconds, 1e-9),
                             probes=probes)

    # 4. Save in open_clip's local-dir format, then evaluate through the embedder that will use it
    if out is not None:
        result.path = save_clip(model, out, config.model_cfg, dtype=getattr(torch, config.save_dtype))
        result.model_id = f"local-dir:{result.path}"
        info = {"train_config": asdict(config), "seconds": seconds, "images_per_second": result.images_per_second,
                "loss_first": losses[0], "loss_last_50": float(np.mean(losses[-50:])),
                "loss_curve": result.loss_summary(16), "probes": probes}
        if evaluate:
            result.metrics = evaluate_clip(Embedder.load(result.model_id, device=config.device, dtype="float32"))
            info["evaluation"] = result.metrics
        atomic_write(result.path / TRAIN_INFO_FILE, json.dumps(info, indent=2))
    return result


# ---------------------------------------------------------------- saving


def save_clip(model: torch.nn.Module, out: str | Path, model_cfg: dict,
              preprocess_cfg: dict = DEMO_PREPROCESS_CFG, dtype: torch.dtype = torch.float16) -> Path:
    """Write open_clip's local-dir folder (weights in `dtype`, then open_clip_config.json); return its path.

    open_clip loads half-precision weights into its float32 model (load_state_dict copies with a cast).
    """
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, safetensors_bytes(state))
    pre = dict(preprocess_cfg, size=model_cfg["vision_cfg"]["image_size"])
    atomic_write(out / CONFIG_FILE, json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=2).encode())
    return out


# ---------------------------------------------------------------- evaluation


def render_set(spec: ToyArtSpec, start: int, n: int) -> tuple[list, list[dict]]:
    """Items start .. start + n - 1 of `spec`: (PIL images, labels)."""
    items = [sample_item(spec, i) for i in range(start, start + n)]
    return [image for image, _ in items], [labels for _, labels in items]


def _agreement(labels: list[dict], rows: np.ndarray, key: str) -> float:
    """Share of (item, neighbour) pairs in `rows` (N, k) whose labels agree on `key`."""
    own = np.array([lab[key] for lab in labels])
    return float((own[rows] == own[:, None]).mean())


def _knn(queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Rows (Q, k) of the k most similar keys to each query by cosine (unit vectors)."""
    sims = queries @ keys.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def evaluate_clip(embedder: Embedder, n_per_style: int = 512, k: int = 4, start: int = EVAL_START,
                  size: int | None = None, seed: int = 0) -> dict:
    """Zero-shot checks of a demo CLIP on held-out toy art, through the embedder the demo uses.

    * zero_shot_*: each image against all 8 x 8 x 6 captions "a red star, neon style" (argmax);
    * text_to_image_*: in each style's own database (the demo's retrieval), the 64 content prompts
      "a red star" retrieve top-1 / top-k images of the prompted shape and colour;
    * image_knn_style_agreement: k nearest images (not itself) in a mixed-style set share its style;
      *_same_content: the same, when every content is present in all six styles (the harsh case).
    """
    size = size or embedder.image_size
    base = ToyArtSpec(size=size, seed=seed)
    contents = [(shape, colour) for shape in SHAPES for colour in COLOURS]  # 64 content pairs
    out: dict = {"n_per_style": n_per_style, "k": k}

    # One set per style, the same indices (so the same contents and placements) in each
    per_style = {s: render_set(replace(base, styles=(s,)), start, n_per_style) for s in STYLES}
    vectors = {s: embedder.encode_images(per_style[s][0]) for s in STYLES}
    labels = {s: per_style[s][1] for s in STYLES}
    all_vec = np.concatenate([vectors[s] for s in STYLES])  # (6 n, D)
    all_lab = [lab for s in STYLES for lab in labels[s]]

    # 1. Zero-shot classification against every full caption
    full = [(sh, co, st) for st in STYLES for sh, co in contents]
    text = embedder.encode_text([make_caption(sh, co, st) for sh, co, st in full])
    pred = [full[i] for i in np.argmax(all_vec @ text.T, axis=1)]
    for j, key in enumerate(("shape", "colour", "style")):
        out[f"zero_shot_{key}"] = float(np.mean([p[j] == lab[key] for p, lab in zip(pred, all_lab)]))

    # 2. Content-only prompts retrieve the prompted shape and colour from each style's database
    prompts = embedder.encode_text([make_caption(sh, co) for sh, co in contents])  # (64, D)
    hits = {"shape": [], "colour": [], "both": [], "shape@1": [], "colour@1": [], "both@1": []}
    for s in STYLES:
        rows = _knn(prompts, vectors[s], k)  # (64, k)
        got = np.array([[(labels[s][r]["shape"], labels[s][r]["colour"]) for r in row] for row in rows])
        want = np.array(contents)[:, None, :]  # (64, 1, 2)
        shape_ok, colour_ok = got[..., 0] == want[..., 0], got[..., 1] == want[..., 1]
        for key, ok in (("shape", shape_ok), ("colour", colour_ok), ("both", shape_ok & colour_ok)):
            hits[key].append(ok.mean())
            hits[key + "@1"].append(ok[:, 0].mean())
    for key, values in hits.items():
        name = key.replace("@1", "_top1") if "@1" in key else f"{key}_at_{k}"
        out[f"text_to_image_{name}"] = float(np.mean(values))

    # 3. Image -> image neighbours share the style
    mixed_images, mixed_labels = render_set(base, start, len(STYLES) * n_per_style)
    mixed = embedder.encode_images(mixed_images)
    rows = _knn(mixed, mixed, k, exclude_self=True)
    for key in ("style", "shape", "colour"):
        out[f"image_knn_{key}_agreement"] = _agreement(mixed_labels, rows, key)
    rows = _knn(all_vec, all_vec, k, exclude_self=True)
    out["image_knn_style_agreement_same_content"] = _agreement(all_lab, rows, "style")
    return out


def format_metrics(metrics: dict) -> str:
    """evaluate_clip's figures as aligned lines."""
    return "\n".join(f"  {key:<42} {value:.3f}" if isinstance(value, float) else f"  {key:<42} {value}"
                     for key, value in metrics.items())
