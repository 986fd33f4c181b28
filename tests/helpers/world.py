"""Helpers the tests share: where the shared reference data is, image folders, the CLI in-process, tiny
collections and adapters. Fixtures are in tests/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.imagezoo import base_picture

REPO = Path(__file__).resolve().parents[2]  # the checkout
# reference data beside the checkout (the CompVis checkpoint and its original outputs): parity tests only, marked
# @pytest.mark.parity; $RDM_TEST_SHARED points elsewhere (a missing folder shows which tests need it)
SHARED = Path(os.environ.get("RDM_TEST_SHARED") or REPO.parent / "shared")
GOLDEN = SHARED / "golden" / "compvis_rdm_small"
SHARED_MISSING = "shared reference data not available"


def need(path: Path) -> Path:
    """The path, or skip the test when the shared reference data beside the checkout is absent (parity tests only:
    tests/conftest.py fails any other test that asks)."""
    if not path.exists():
        pytest.skip(f"{SHARED_MISSING}: {path}")
    return path


def make_folder(root: Path, n: int, seed: int = 100) -> list[str]:
    """n distinct pictures as PNGs; returns their relative paths, sorted."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.fromarray(base_picture(seed + i)).save(root / name)
        names.append(name)
    return sorted(names)


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, ok: bool = True, env: dict | None = None):
    """`rdm ARGS...` in-process (click's runner); asserts exit 0 unless ok=False."""
    from click.testing import CliRunner

    from rdm.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def tiny_collection(root: Path, tiny_clip: str, n: int, seed: int, name: str) -> tuple[Path, Path]:
    """n pictures in root/pics as database `name` in root/indexes, and a tiny RDM for the same CLIP (k=3):
    (databases home, model folder)."""
    from rdm import api
    from rdm.models.tiny import make_tiny_rdm

    make_folder(root / "pics", n, seed=seed)
    home = root / "indexes"
    api.build_index(str(root / "pics"), name=name, clip=tiny_clip, indexes=str(home), workers=0, progress=False)
    return home, make_tiny_rdm(root / "model", api.load_embedder(tiny_clip).identity.to_dict(), k=3)


def make_adapter(out: Path, model: Path, seed: int, base_fingerprint: str, rank: int = 2,
                 targets: str = "cross-attention", layers: tuple[str, ...] | None = None) -> Path:
    """A LoRA adapter with random (non-zero) weights on `model`'s U-Net, saved as rdm train saves one (`layers`:
    peft's target_modules instead of those `targets` names)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from rdm.models.adapters import attach, save_adapter

    unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet")
    torch.manual_seed(seed)
    if layers is not None:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=float(rank), target_modules=list(layers)))
        params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    else:
        params = attach(unet, rank, float(rank), targets)
    for p in params:
        p.data.normal_(0, 0.2)
    meta = {"rank": rank, "alpha": float(rank), "targets": targets, "base_fingerprint": base_fingerprint,
            "base_model": Path(model).name, "database": "test", "database_fingerprint": "0" * 16, "steps": 1,
            "seed": seed}
    return save_adapter(out, unet, meta).path


def rdm_process(*args, env=None, check=True, timeout=300):
    """`rdm ARGS...` in a process of its own (python -m rdm.cli); raises with its stderr unless it exits 0."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rdm.cli", *map(str, args)], capture_output=True, text=True,
                         env=env or cli_env(), timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"rdm {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr}")
    return out


def planted_toyart(folder: Path) -> tuple[dict, dict]:
    """48 flat toy-art pictures, each a different shape and colour, and planted problems: 12 copies of 12 of them
    (4 resized, 4 JPEG-70, 4 cropped 3%; named z-copy*), 4 pictures of other styles and one photograph-like noise
    picture (m-*). Returns ({copy: original}, {off-style item: its kind})."""
    import io

    import numpy as np
    from PIL import Image

    from rdm.demo.toyart import COLOURS, SHAPES, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    pairs = [(s, c) for s in SHAPES for c in COLOURS][:48]
    for i, (shape, colour) in enumerate(pairs):
        render(shape, colour, "flat", 64, x=0.3 + 0.4 * rng.random(), y=0.3 + 0.4 * rng.random(),
               scale=0.25 + 0.1 * rng.random(), rng=np.random.default_rng(i)).save(folder / f"a{i:03d}.png")
    copies = {}
    for j, i in enumerate(range(0, 48, 4)):
        original = Image.open(folder / f"a{i:03d}.png").convert("RGB")
        name = f"z-copy{j:02d}.png"
        if j % 3 == 0:
            original.resize((96, 96), Image.BICUBIC).save(folder / name)
        elif j % 3 == 1:
            buf = io.BytesIO()
            original.save(buf, format="JPEG", quality=70)
            Image.open(buf).save(folder / name)
        else:
            original.crop((2, 2, 62, 62)).resize((64, 64), Image.BICUBIC).save(folder / name)
        copies[name] = f"a{i:03d}.png"
    off = {}
    for j, style in enumerate(("neon", "neon", "mosaic", "striped")):
        name = f"m-off{j}.png"
        render(SHAPES[j], list(COLOURS)[j], style, 64, rng=np.random.default_rng(100 + j)).save(folder / name)
        off[name] = style
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "m-photo.png")
    off["m-photo.png"] = "photo"
    return copies, off
