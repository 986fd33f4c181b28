"""Measure the peak memory of decoding one image through the service's paths, per image mode: the factors of
rdm.images.budget.DECODE_BYTES_PER_PIXEL.

For each kind of image (a 2000x2000 PNG, JPEG or TIFF of each mode PIL opens), a fresh Python process reads the
file's bytes, decodes a small image of the same kind once (imports, first-call allocations), then resets its peak RSS
(writes "5" to /proc/self/clear_refs), runs one of the service's decode paths and reports VmHWM - VmRSS-before:

  query     rdm.service.images.decode_query_image: the embedder's PixelTransform(224).load (uploads, base64 and URL
            queries; JPEGs drafted at >= 448 px)
  editable  rdm.service.engine.Engine.editable_image: decode_image without draft, then the thumbnail kept for editing

The factor is the larger growth / pixels; the table also shows the factor in the code for the image's cost class
and flags any class whose code factor is below a measurement. Linux only (/proc).

    python scripts/measure_decode_cost.py [--side 2000] [--check-side 6000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# -- images ---------------------------------------------------------------------------------------

def _plane(side: int, seed: int, top: int) -> np.ndarray:
    """A smooth gradient with a little noise, 0..top (realistic content; size does not depend on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    v = (x + y) / (2 * side) * top + rng.normal(0, top / 100, (side, side)).astype(np.float32)
    return np.clip(v, 0, top)


def _png16(path: Path, planes: list[np.ndarray], colour_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grey only): colour type 0 grey, 4 grey+alpha, 2 RGB, 6 RGBA."""
    h, w = planes[0].shape
    px = np.stack([p.astype(">u2") for p in planes], axis=-1).reshape(h, w * len(planes))
    raw = b"".join(b"\x00" + row.tobytes() for row in px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))


def make(kind: str, side: int, path: Path) -> None:
    g = _plane(side, 1, 255).astype(np.uint8)
    rgb = np.stack([g, _plane(side, 2, 255).astype(np.uint8), _plane(side, 3, 255).astype(np.uint8)], -1)
    a = _plane(side, 4, 255).astype(np.uint8)
    if kind == "1 png":
        Image.fromarray(g > 127).save(path, "PNG")
    elif kind == "L png":
        Image.fromarray(g, "L").save(path, "PNG")
    elif kind == "L+tRNS png":
        Image.fromarray(g, "L").save(path, "PNG", transparency=0)
    elif kind == "LA png":
        Image.merge("LA", [Image.fromarray(g, "L"), Image.fromarray(a, "L")]).save(path, "PNG")
    elif kind == "P png":
        Image.fromarray(rgb, "RGB").quantize(256).save(path, "PNG")
    elif kind == "P+tRNS png":
        Image.fromarray(rgb, "RGB").quantize(256).save(path, "PNG", transparency=0)
    elif kind == "P gif":
        Image.fromarray(rgb, "RGB").quantize(256).save(path, "GIF")
    elif kind == "RGB png":
        Image.fromarray(rgb, "RGB").save(path, "PNG")
    elif kind == "RGB+tRNS png":
        Image.fromarray(rgb, "RGB").save(path, "PNG", transparency=(0, 0, 0))
    elif kind == "RGB jpeg":
        Image.fromarray(rgb, "RGB").save(path, "JPEG", quality=90)
    elif kind == "RGB jpeg rotated":  # EXIF orientation 6: exif_transpose makes a rotated copy
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb, "RGB").save(path, "JPEG", quality=90, exif=exif)
    elif kind == "RGB webp":
        Image.fromarray(rgb, "RGB").save(path, "WEBP", quality=80)
    elif kind == "RGBA webp":
        Image.fromarray(np.dstack([rgb, a]), "RGBA").save(path, "WEBP", quality=80)
    elif kind == "RGB tiff":
        Image.fromarray(rgb, "RGB").save(path, "TIFF")
    elif kind == "RGB bmp":
        Image.fromarray(rgb, "RGB").save(path, "BMP")
    elif kind == "RGBA png":
        Image.fromarray(np.dstack([rgb, a]), "RGBA").save(path, "PNG")
    elif kind == "I;16 png":  # 16-bit grey PNG: PIL opens it as I;16
        Image.frombytes("I;16", (side, side), _plane(side, 5, 65535).astype("<u2").tobytes()).save(path, "PNG")
    elif kind == "I;16 tiff":
        Image.frombytes("I;16", (side, side), _plane(side, 5, 65535).astype("<u2").tobytes()).save(path, "TIFF")
    elif kind == "LA 16-bit png":
        _png16(path, [_plane(side, 6, 65535), _plane(side, 7, 65535)], 4)
    elif kind == "RGB 16-bit png":
        _png16(path, [_plane(side, s, 65535) for s in (8, 9, 10)], 2)
    elif kind == "RGBA 16-bit png":
        _png16(path, [_plane(side, s, 65535) for s in (8, 9, 10, 11)], 6)
    elif kind == "I tiff":  # 32-bit integers above 65535: the third scale of _to_8bit
        Image.frombytes("I", (side, side), (_plane(side, 12, 1e6)).astype("<i4").tobytes()).save(path, "TIFF")
    elif kind == "F tiff":
        Image.frombytes("F", (side, side), _plane(side, 13, 1.0).astype("<f4").tobytes()).save(path, "TIFF")
    elif kind == "CMYK jpeg":
        Image.fromarray(np.dstack([rgb, a]), "CMYK").save(path, "JPEG", quality=90)
    elif kind == "CMYK tiff":
        Image.fromarray(np.dstack([rgb, a]), "CMYK").save(path, "TIFF")
    else:
        raise ValueError(kind)


KINDS = ["1 png", "L png", "L+tRNS png", "LA png", "P png", "P+tRNS png", "P gif", "RGB png", "RGB+tRNS png",
         "RGB jpeg", "RGB jpeg rotated", "RGB tiff", "RGB bmp", "RGB webp", "RGBA webp", "RGBA png", "I;16 png",
         "I;16 tiff", "LA 16-bit png", "RGB 16-bit png", "RGBA 16-bit png", "I tiff", "F tiff", "CMYK jpeg",
         "CMYK tiff"]


# -- one measurement (a child process) ------------------------------------------------------------

def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(path: str, warm: str, route: str) -> dict:
    from types import SimpleNamespace

    from rdm.images.budget import DecodeBudget, cost_class, read_header
    from rdm.images.pixels import PixelTransform
    from rdm.service.config import ServeConfig
    from rdm.service.engine import Engine
    from rdm.service.images import decode_query_image

    config = ServeConfig(max_pixels=100_000_000, max_upload_bytes=1 << 31)
    unbounded = DecodeBudget(1 << 60)
    if route == "query":
        transform = PixelTransform(224)

        def run(data):
            return decode_query_image(data, transform, config, unbounded)
    else:
        engine = SimpleNamespace(config=config, decode_budget=unbounded,
                                 pipe=SimpleNamespace(rdm_config=SimpleNamespace(resolution=256)))

        def run(data):
            return Engine.editable_image(engine, data)

    run(Path(warm).read_bytes())
    data = Path(path).read_bytes()
    with Image.open(path) as im:
        opened, klass = im.mode, cost_class(im)
    header = read_header(data)
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = run(data)
    peak = _status("VmHWM")
    del out
    return {"mode": opened, "class": klass, "pixels": header.width * header.height, "growth": peak - before,
            "estimate": header.cost}


# -- the table ------------------------------------------------------------------------------------

def measure(kind: str, side: int, folder: Path) -> dict:
    ext = kind.split()[-1] if kind.split()[-1] in ("png", "jpeg", "tiff", "gif", "webp", "bmp") else "png"
    path, warm = folder / f"{kind.replace(' ', '_')}.{ext}", folder / f"warm-{kind.replace(' ', '_')}.{ext}"
    make(kind, side, path)
    make(kind, 64, warm)
    row = {"kind": kind, "side": side, "bytes": path.stat().st_size}
    for route in ("query", "editable"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, __file__, "--child", str(path), str(warm), route], env=env,
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(mode=result["mode"], klass=result["class"], pixels=result["pixels"], estimate=result["estimate"])
        row[route] = result["growth"]
    path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=2000, help="side of the square images measured")
    parser.add_argument("--check-side", type=int, default=6000,
                        help="also measure a 16-bit grey PNG of this side (linearity check; 0: skip)")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "WARM", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from rdm.images.budget import DECODE_BYTES_PER_PIXEL, UNKNOWN_BYTES_PER_PIXEL

    print(f"Pillow {PIL.__version__}, numpy {np.__version__}; peak RSS growth per decode, bytes per pixel")
    print(f"{'image':<18} {'opened as':<9} {'class':<16} {'px':>6} {'file':>9} {'query':>7} {'editable':>8} "
          f"{'max':>6} {'code':>5}  est/peak")
    worst: dict[str, float] = {}
    runs = [(k, args.side) for k in KINDS] + ([("I;16 png", args.check_side)] if args.check_side else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind, side in runs:
            r = measure(kind, side, Path(tmp))
            q, e = r["query"] / r["pixels"], r["editable"] / r["pixels"]
            top = max(q, e)
            code = DECODE_BYTES_PER_PIXEL.get(r["klass"], UNKNOWN_BYTES_PER_PIXEL)
            worst[r["klass"]] = max(worst.get(r["klass"], 0.0), top)
            flag = "" if code >= top else "  <-- code factor below measurement"
            print(f"{kind:<18} {r['mode']:<9} {r['klass']:<16} {side}^2 {r['bytes'] / 1e3:>7.0f}K {q:>7.2f} "
                  f"{e:>8.2f} {top:>6.2f} {code:>5}  {r['estimate'] / max(r['query'], r['editable']):>5.2f}{flag}")
            sys.stdout.flush()
    print("\nper cost class, the worst measured + 2%, rounded up (the code's factor):")
    for klass, top in worst.items():
        code = DECODE_BYTES_PER_PIXEL.get(klass, UNKNOWN_BYTES_PER_PIXEL)
        print(f"  {klass!r}: {int(np.ceil(top * 1.02))}  (code {code})")


if __name__ == "__main__":
    main()
