"""The toy-art judge: a small CNN with three heads (style, shape, colour) trained on rendered toy art.

It labels generated samples for the style-swap evaluation (rdm.demo.evaluate), so it is trained with
the blemishes a small diffusion model adds: mild Gaussian blur, pixel noise, small shifts, zooms and
turns, and small brightness/contrast changes (hue is never jittered: colour is a label). Images of any
size are resized (antialiased) to the classifier's input side, so 128 px samples are judged too.

A saved classifier is a folder: classifier.safetensors (weights) and classifier.json (config, label
lists and the held-out accuracies it reached).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import RDMError
from ..util.files import atomic_write
from .clip import autocast_dtype
from .toyart import COLOURS, SHAPES, STYLES, ToyArtSpec, sample_item

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
HEADS = ("style", "shape", "colour")
LABELS = {"style": STYLES, "shape": SHAPES, "colour": tuple(COLOURS)}  # head -> class names, in logit order


@dataclass(frozen=True)
class ClassifierConfig:
    """The network: a stride-2 stem, conv stages that each halve the side, average pooling, a linear head per label."""

    image_size: int = 64  # inputs are resized to this side before the first convolution
    stem: int = 24  # channels of the stem (one 3x3 stride-2 conv, BN, ReLU)
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each stage (two 3x3 convs, BN, ReLU, 2x2 max-pool)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))


@dataclass(frozen=True)
class Augment:
    """Generator-like blemishes applied to training batches, each drawn per image."""

    blur_prob: float = 0.5  # chance of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.3, 1.0)  # its sigma range, in pixels at the input side
    noise_std: float = 0.04  # max std of additive Gaussian noise (images in [0, 1]); drawn uniformly from [0, max]
    shift: float = 0.06  # max translation, fraction of the side
    zoom: float = 0.08  # max relative scale change
    turn: float = 8.0  # max rotation, degrees
    brightness: float = 0.05  # max additive brightness change
    contrast: float = 0.08  # max relative contrast change
    tint: float = 0.0  # max weight of a blend towards a random colour (0: off), for judging samples whose
    #                    backgrounds are tinted, which the style, shape and colour labels do not depend on


@dataclass
class ClassifierTrainConfig:
    """How to train the judge; the result is a pure function of these fields."""

    n_train: int = 24_000  # rendered training images (toy-art items 0 .. n_train - 1 of data_seed)
    n_eval: int = 3_000  # held-out images (toy-art items of eval_seed) for the reported accuracy
    epochs: int = 8  # passes over the training images, freshly augmented each time
    batch_size: int = 128
    lr: float = 3e-3  # peak AdamW learning rate (one-cycle: warm-up then cosine decay)
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    render_sizes: tuple[int, ...] = (64,)  # toy-art sides rendered for training, cycled by index (e.g. (64, 128))
    seed: int = 0  # torch seed: initial weights, batch order, augmentation
    data_seed: int = 1  # ToyArtSpec seed of the training images
    eval_seed: int = 2  # ToyArtSpec seed of the held-out images
    device: str = "cpu"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA or CPUs with native bf16), "bf16" or "fp32"
    augment: Augment = field(default_factory=Augment)
    log_every: int = 50  # steps between log lines


# ---------------------------------------------------------------- the network


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU, then a 2x2 max-pool: (B, c_in, s, s) -> (B, c_out, s/2, s/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ToyArtClassifier(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> {head: logits (B, classes)} for style, shape and colour."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig(), labels: dict | None = None):
        super().__init__()
        self.config = config
        self.labels = {h: tuple((labels or LABELS)[h]) for h in HEADS}
        widths = (config.stem, *config.widths)
        self.features = nn.Sequential(
            nn.Conv2d(3, config.stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(config.stem),
            nn.ReLU(inplace=True), *[_stage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.heads = nn.ModuleDict({h: nn.Linear(widths[-1], len(self.labels[h])) for h in HEADS})
        self.metrics: dict = {}  # held-out accuracies recorded when it was saved

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(x * 2.0 - 1.0)  # (B, C, s / 2^(n+1), s / 2^(n+1))
        h = h.mean(dim=(2, 3))  # (B, C)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> list[dict]:
        """PIL images (any size) or a (B, 3, H, W) tensor in [0, 1] -> [{style, shape, colour, *_prob}]."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = chunk if isinstance(chunk, torch.Tensor) else pil_to_tensor(chunk)
            probs = {h: p.softmax(-1).cpu() for h, p in self(x.to(device).float()).items()}
            for b in range(len(x)):
                row = {}
                for h in HEADS:
                    j = int(probs[h][b].argmax())
                    row[h], row[f"{h}_prob"] = self.labels[h][j], float(probs[h][b, j])
                out.append(row)
        self.train(was_training)
        return out

    # -- saving and loading -------------------------------------------------------------------------
    def save(self, path: str | Path, metrics: dict | None = None, train_config: dict | None = None) -> Path:
        """Write classifier.safetensors, then classifier.json (config, labels, metrics); return the folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / WEIGHTS_FILE, safetensors_bytes(state))
        meta = {"config": asdict(self.config), "labels": {h: list(v) for h, v in self.labels.items()},
                "metrics": metrics or {}, "train_config": train_config or {}}
        atomic_write(path / CONFIG_FILE, json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ToyArtClassifier":
        """A classifier folder written by `save`, in eval mode."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise RDMError(f"{path} is not a toy-art classifier folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                           "train one with `python scripts/eval_style_swap.py classifier --out PATH`")
        meta = json.loads((path / CONFIG_FILE).read_text())
        model = cls(ClassifierConfig(**meta["config"]), meta["labels"])
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        model.metrics = meta.get("metrics", {})  # type: ignore[assignment]
        return model.to(device).eval()


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float (B, 3, H, W) in [0, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise RDMError(f"images to classify in one batch must share a size, got {sorted(sizes)}")
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- data and augmentation


Group = tuple[torch.Tensor, dict[str, torch.Tensor]]  # uint8 images (n, 3, s, s) and {head: class indices (n,)}


def render_labelled(spec: ToyArtSpec, n: int, start: int = 0, sizes: Sequence[int] | None = None) -> list[Group]:
    """Toy-art items start .. start + n - 1, item i drawn at sides[i % len(sizes)], grouped by side."""
    sizes = tuple(sizes or (spec.size,))
    groups = []
    for k, side in enumerate(sizes):
        side_spec = ToyArtSpec(**{**asdict(spec), "size": side})
        items = [sample_item(side_spec, i) for i in range(start + k, start + n, len(sizes))]
        if not items:
            continue
        pixels = np.stack([np.asarray(image, dtype=np.uint8) for image, _ in items])  # (n, s, s, 3)
        targets = {h: torch.tensor([LABELS[h].index(labels[h]) for _, labels in items]) for h in HEADS}
        groups.append((torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), targets))
    return groups


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (B, 2 radius + 1); sigma 0 gives a delta."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None, :] / sigmas.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def augment(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Generator-like blemishes on images (B, 3, H, W) in [0, 1], each drawn per image from `generator`."""
    b, _, h, w = x.shape

    def u(lo, hi, *shape):  # uniform draws from the generator
        return torch.rand(*(shape or (b,)), generator=generator) * (hi - lo) + lo

    # 1. Affine: shift, zoom, turn (border pixels repeat: toy-art backgrounds are uniform or tiled)
    angle = torch.deg2rad(u(-aug.turn, aug.turn))
    scale = 1.0 + u(-aug.zoom, aug.zoom)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-aug.shift, aug.shift) * 2], 1),
                         torch.stack([sin, cos, u(-aug.shift, aug.shift) * 2], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # 2. Gaussian blur with a per-image sigma: one grouped separable convolution
    sigma = torch.where(torch.rand(b, generator=generator) < aug.blur_prob, u(*aug.blur_sigma),
                        torch.zeros(b)) * (h / 64.0)
    radius = max(1, math.ceil(3 * float(sigma.max()))) if float(sigma.max()) > 0 else 0
    if radius:
        k = _gaussian_kernels(sigma, radius).to(x).repeat_interleave(3, dim=0)  # (3B, K)
        y = F.pad(x.reshape(1, 3 * b, h, w), (radius, radius, radius, radius), mode="replicate")
        y = F.conv2d(y, k[:, None, None, :], groups=3 * b)
        x = F.conv2d(y, k[:, None, :, None], groups=3 * b).reshape(b, 3, h, w)

    # 3. Contrast and brightness about each image's mean grey, then pixel noise
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1.0 + u(-aug.contrast, aug.contrast)).view(b, 1, 1, 1).to(x)
    x = (x - mean) * contrast + mean + u(-aug.brightness, aug.brightness).view(b, 1, 1, 1).to(x)
    if aug.tint > 0:  # drawn only when on, so that tint-free training draws what it always drew
        colour = torch.rand(b, 3, 1, 1, generator=generator).to(x)
        weight = u(0, aug.tint).view(b, 1, 1, 1).to(x)
        x = x * (1 - weight) + colour * weight
    noise = torch.randn(x.shape, generator=generator).to(x) * u(0, aug.noise_std).view(b, 1, 1, 1).to(x)
    return (x + noise).clamp(0.0, 1.0)


# ---------------------------------------------------------------- training and evaluation


@torch.no_grad()
def accuracy(model: ToyArtClassifier, groups: Sequence[Group], aug: Augment | None = None, seed: int = 0,
             batch_size: int = 256) -> dict[str, float]:
    """Per-head accuracy on image groups (as from render_labelled), optionally after `augment`."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = {h: 0 for h in HEADS}
    for images, targets in groups:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float() / 255.0
            if aug is not None:
                x = augment(x, aug, generator)
            logits = model(x.to(device))
            for h in HEADS:
                correct[h] += int((logits[h].argmax(-1).cpu() == targets[h][i:i + batch_size]).sum())
    n = sum(len(images) for images, _ in groups)
    return {h: correct[h] / n for h in HEADS}


def train_classifier(config: ClassifierTrainConfig, model_config: ClassifierConfig = ClassifierConfig(),
                     out: str | Path | None = None, log: Callable[[str], None] | None = None
                     ) -> tuple[ToyArtClassifier, dict]:
    """Train the judge on rendered toy art; return it and its held-out accuracies (clean and augmented)."""
    # 1. Data: training and held-out items from different toy-art seeds
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    size = model_config.image_size
    train = render_labelled(ToyArtSpec(size=size, seed=config.data_seed), config.n_train, sizes=config.render_sizes)
    heldout = render_labelled(ToyArtSpec(size=size, seed=config.eval_seed), config.n_eval, sizes=config.render_sizes)
    render_s = time.perf_counter() - start

    # 2. Model, optimiser, one-cycle schedule
    device = torch.device(config.device)
    model = ToyArtClassifier(model_config).to(device)
    amp = autocast_dtype(config.precision, device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = sum(len(images) // config.batch_size for images, _ in train)
    if steps_per_epoch == 0:
        raise RDMError(f"n_train {config.n_train} gives no full batch of {config.batch_size}; lower the batch size")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)

    # 3. Epochs of freshly augmented batches, each batch from one image side
    step, seen = 0, 0
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        batches = [(images, targets, perm[i:i + config.batch_size]) for images, targets in train
                   for perm in [torch.randperm(len(images), generator=generator)]
                   for i in range(0, len(images) - config.batch_size + 1, config.batch_size)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            images, targets, rows = batches[j]
            x = augment(images[rows].float() / 255.0, config.augment, generator)  # (B, 3, s, s)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x.to(device))
            loss = sum(F.cross_entropy(logits[h].float(), targets[h][rows].to(device),
                                       label_smoothing=config.label_smoothing) for h in HEADS)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            step, seen = step + 1, seen + len(rows)
            if log and step % config.log_every == 0:
                rate = seen / (time.perf_counter() - start)
                log(f"epoch {epoch + 1}/{config.epochs}  step {step}  loss {loss.item():.4f}  {rate:.0f} img/s")
    train_s = time.perf_counter() - start

    # 4. Held-out accuracy, on clean images and with the training blemishes
    metrics = {"heldout": accuracy(model, heldout), "heldout_augmented": accuracy(model, heldout, config.augment, 1),
               "n_train": config.n_train, "n_eval": config.n_eval, "render_seconds": render_s,
               "train_seconds": train_s, "images_per_second": seen / max(train_s, 1e-9)}
    if log:
        log("held-out accuracy " + ", ".join(f"{h} {metrics['heldout'][h]:.4f}" for h in HEADS)
            + "  (augmented: " + ", ".join(f"{h} {metrics['heldout_augmented'][h]:.4f}" for h in HEADS) + ")")
    model.eval()
    if out is not None:
        model.save(out, metrics, train_config=json.loads(json.dumps(asdict(config))))
    return model, metrics
