"""Benchmark: building databases (vs encoder-only and vs diffusers' research RDM retriever) and search.

    python scripts/bench_index.py                 # everything (build: 4096 images; search: 100k exact, 1M IVF)
    python scripts/bench_index.py --quick         # smaller sizes, for a smoke run
    python scripts/bench_index.py --part build    # or --part search

Build: for each model (ViT-B-32 with random weights — the speed does not depend on the weights — and
the tiny test CLIP) and the dtype rdm picks, three figures measured in the same run on the same JPEGs:
  encoder-only   pixels already decoded and resized, batched through encode_pixels;
  rdm build      build_database end to end (decoding in spawned workers overlapped with encoding);
  ray build      the same build with --engine ray on a local Ray cluster of all this machine's CPUs
                 (read + decode as Ray tasks, one embedding actor; needs `pip install "rdm[ray]"`,
                 skipped without it); its segment-write and commit times are printed beside it;
  baseline       diffusers' examples/research_projects/rdm/retriever.py way: `dataset.map`, one image
                 per call, float32, no batching (same open_clip model and preprocessing).
Search: exact ("Flat") over 100k x 768 and the default approximate index over 1M x 768 random unit
vectors near a 24-dimensional subspace (structured like real embeddings; isotropic noise in 768
dimensions has no neighbourhood structure for any index to use, and tight clusters make it trivial): queries/s (batches of 256 and single queries) and recall@10 against exact search.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from rdm.build import BuildOptions, build_database
from rdm.images.decode import decode_image
from rdm.embed.embedder import Embedder
from rdm.sources import FolderSource
from rdm.models.tiny import make_tiny_clip


def write_jpegs(root: Path, n: int, size=(512, 384), seed=0) -> None:
    """n smooth random pictures as JPEGs (photo-sized, so decoding costs what it costs in practice)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.005, 0.05, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([127 + 120 * np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)


def save_random_openclip(arch: str, path: Path) -> str:
    """An open_clip architecture with random weights in local-dir format (no download needed)."""
    import json

    cfg = open_clip.get_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return f"local-dir:{path}"


def encoder_only(emb: Embedder, files: list[Path], batch: int) -> float:
    pixels = np.stack([emb.pixel_transform(decode_image(f)) for f in files])
    emb.encode_pixels(pixels[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        emb.encode_pixels(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - t)


def rdm_build(emb: Embedder, root: Path, batch: int, home: Path) -> float:
    t = time.perf_counter()
    report = build_database(FolderSource(root), f"bench{time.time_ns()}", emb, home,
                            BuildOptions(batch_size=batch, progress=False))
    assert report.embedded == len(FolderSource(root))
    return report.embedded / (time.perf_counter() - t)


def ray_build(emb: Embedder, root: Path, batch: int, home: Path) -> float | None:
    """--engine ray end to end on a local cluster started beforehand (its start-up is not counted)."""
    try:
        import ray
    except ImportError:
        return None
    from rdm.build.ray_data import RayEngine

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    t = time.perf_counter()
    report = build_database(FolderSource(root), f"bench{time.time_ns()}", emb, home,
                            BuildOptions(batch_size=batch, progress=False), engine=RayEngine())
    assert report.embedded == len(FolderSource(root))
    return report.embedded / (time.perf_counter() - t)


def segment_write_and_commit(dim: int, home: Path) -> tuple[float, float]:
    """MB/s of write_segment (1024 float32 rows + metadata) and seconds of a manifest commit."""
    from rdm.db import store
    from rdm.db.manifest import rows_to_table, skipped_table
    from rdm.db.segment import write_segment

    rows = 1024
    vec = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    meta = rows_to_table([{"id": f"{i:09d}", "path": f"/data/{i:09d}.jpg", "caption": "a caption " * 5}
                          for i in range(rows)])
    home.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    n = 8
    entries = [write_segment(home, i * rows, vec, meta, skipped_table([])) for i in range(n)]
    mb = sum(e["bytes"] for x in entries for e in x["files"].values()) / 1e6
    write = mb / (time.perf_counter() - t)
    t = time.perf_counter()
    store.atomic_write_json(home / "manifest.json", {"segments": entries * 1000})  # a 8000-segment manifest
    return write, time.perf_counter() - t


def diffusers_baseline(model_id: str, root: Path, n: int) -> float:
    """The research retriever's loop: dataset.map, one image per call, float32, no batching."""
    import datasets

    emb32 = Embedder.load(model_id, device="cpu", dtype="float32")
    model, preprocess = emb32.model, open_clip.create_model_and_transforms(model_id)[2]
    files = sorted(root.glob("*.jpg"))[:n]
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", datasets.Image())

    def one(example):
        image = example["image"]
        if image.mode != "RGB":
            image = image.convert("RGB")
        with torch.no_grad():
            feats = model.encode_image(preprocess(image)[None])
        return {"embeddings": (feats / feats.norm(dim=-1, keepdim=True))[0].numpy()}

    t = time.perf_counter()
    ds.map(one, keep_in_memory=True, load_from_cache_file=False, desc=None)
    return len(files) / (time.perf_counter() - t)


def bench_build(n: int, batch: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "jpegs", n)
        files = sorted((tmp / "jpegs").glob("*.jpg"))
        models = {"ViT-B-32 (random weights)": save_random_openclip("ViT-B-32", tmp / "vitb32"),
                  "tiny test CLIP": make_tiny_clip(tmp / "tiny")}
        for label, model_id in models.items():
            emb = Embedder.load(model_id, device="cpu")
            enc = encoder_only(emb, files, batch)
            build = rdm_build(emb, tmp / "jpegs", batch, tmp / "ix")
            on_ray = ray_build(emb, tmp / "jpegs", batch, tmp / "ix")
            base = diffusers_baseline(model_id, tmp / "jpegs", min(n, 128))
            ray_cols = ("n/a", "n/a") if on_ray is None else (on_ray, on_ray / build)
            rows.append((label, str(emb.dtype).replace("torch.", ""), enc, build, build / enc, *ray_cols, base,
                         build / base))
            print(f"  {label}: encoder {enc:.1f}/s, build {build:.1f}/s, ray {on_ray or 0:.1f}/s, "
                  f"baseline {base:.1f}/s", file=sys.stderr)
        write, commit = segment_write_and_commit(768, tmp / "segments")
        print(f"  segment writes {write:.0f} MB/s (1024 x 768 float32 + metadata each); "
              f"commit of an 8000-segment manifest {commit:.2f} s", file=sys.stderr)
    return rows


def table(header: list[str], rows: list[tuple]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["build", "search", "all"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}", file=sys.stderr)
    if args.part in ("build", "all"):
        n = args.images or (128 if args.quick else 4096)  # Ray's ~15 s start-up amortised
        rows = bench_build(n, args.batch_size)
        print(f"\nBuild throughput, {n} JPEGs 512x384, batch {args.batch_size} (images/s)\n")
        print(table(["model", "dtype", "encoder-only", "rdm build", "build/encoder", "ray build", "ray/local",
                     "diffusers retriever loop", "build/retriever"], rows))
    if args.part in ("search", "all"):
        print("\nsearch, open, remove, append and compaction at scale: python scripts/bench_scale.py", file=sys.stderr)


if __name__ == "__main__":
    main()
