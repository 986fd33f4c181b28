"""Test images of every kind the decoder must handle, and broken files it must skip."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray, bit_depth: int = 16, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB); `size` overrides the header's dimensions."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    hw, hh = size or (w, h)
    header = struct.pack(">IIBBBBB", hw, hh, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def base_picture(seed: int = 0, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth picture on a white background: shapes whose colours depend on the seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 255, np.uint8)
    for _ in range(3):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(6, 16)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.integers(0, 200, 3)
    img[h // 3: h // 2, 5: w - 5] = rng.integers(0, 200, 3)
    return img


def twins(base: np.ndarray) -> dict[str, bytes]:
    """The same picture as EXIF-rotated JPEG-free PNG, transparent-over-white RGBA and 16-bit RGB PNG."""
    out = {}
    im = Image.fromarray(base)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored pixels must be rotated 90 degrees clockwise to display
    buf = io.BytesIO()
    im.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif)
    out["exif_rotated.png"] = buf.getvalue()
    white = (base == 255).all(-1)
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[white] = [13, 200, 77, 0]  # fully transparent, with a colour that must not show through
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out["transparent.png"] = buf.getvalue()
    out["sixteen_bit.png"] = png_bytes(base.astype(np.uint16) * 257, 16)
    return out


def write_zoo(root: Path) -> tuple[list[str], dict[str, str]]:
    """Write good images of every kind and broken files; return (good relative paths, bad path -> reason)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    good: dict[str, bytes | Image.Image] = {}
    base = base_picture(0)
    good["twins/original.png"] = Image.fromarray(base)
    for name, data in twins(base).items():
        good[f"twins/{name}"] = data
    pic = lambda s: Image.fromarray(base_picture(s))  # noqa: E731
    good["photo.jpg"] = pic(1)
    good["UPPER.JPEG"] = pic(2)
    good["nested/palette.gif"] = pic(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good["nested/gray.png"] = pic(4).convert("L")
    good["nested/deeper/bitmap.bmp"] = pic(5)
    good["nested/deeper/picture.webp"] = pic(6)
    good["scan.tif"] = pic(7)
    good["cmyk.jpg"] = pic(8).convert("CMYK")
    good["la.png"] = pic(9).convert("LA")
    good["one_bit.png"] = pic(10).convert("1")
    good["gray16.png"] = png_bytes(np.asarray(pic(11).convert("L")).astype(np.uint16) * 257, 16)
    good["float.tiff"] = Image.fromarray(np.asarray(pic(12).convert("L"), np.float32) / 255.0, "F")
    good["strip_1x20000.png"] = Image.fromarray(np.tile(base_picture(13)[:1, :1], (20000, 1, 1)).reshape(20000, 1, 3))
    frames = [pic(14), pic(15)]
    for rel, obj in good.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            obj.save(path)
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good_names = sorted(list(good) + ["animated.gif"])

    bad = {
        "empty.png": "empty",
        "html_saved_as.png": "not-an-image",
        "truncated.jpg": "truncated",
        "dangling_link.jpg": "missing",
        "bomb.png": "decompression-bomb",
        "nested/also_empty.webp": "empty",
    }
    (root / "empty.png").write_bytes(b"")
    (root / "nested/also_empty.webp").write_bytes(b"")
    (root / "html_saved_as.png").write_text("<!doctype html><html><body>404 not found</body></html>")
    buf = io.BytesIO()
    pic(16).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    os.symlink(root / "does_not_exist.jpg", root / "dangling_link.jpg")
    (root / "bomb.png").write_bytes(png_bytes(np.zeros((2, 2), np.uint8), 8, size=(40000, 40000)))
    (root / "notes.txt").write_text("not an image extension: ignored, not skipped")
    return good_names, bad


def write_shards(root: Path, shards: int = 3, per_shard: int = 5) -> list[str]:
    """img2dataset-style webdataset shards: KEY.jpg + KEY.json + KEY.txt per sample; returns the keys.

    Shard 1's third image is corrupt (garbage bytes) and shard 2 is cut off in the middle of a member.
    """
    import json
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(base_picture(50 + s * per_shard + i)).save(buf, "JPEG")
                image = buf.getvalue() if (s, i) != (1, 2) else b"\xff\xd8" + bytes(range(256)) * 4
                meta = {"url": f"https://example.org/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": 48, "height": 40, "original_width": 48, "original_height": 40}
                for ext, data in (("jpg", image), ("json", json.dumps(meta).encode()), ("txt", f"picture {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
    last = root / f"{shards - 1:05d}.tar"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2 + 700])  # inside a member's data: that sample is truncated
    return keys


def picture_png(seed: int) -> bytes:
    """base_picture(seed) as PNG bytes (PIL)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(base_picture(seed)).save(buf, "PNG")
    return buf.getvalue()
