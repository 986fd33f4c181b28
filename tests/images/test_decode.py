import io
import resource

import numpy as np
import pytest
from PIL import Image

from rdm.images.decode import DecodeOptions, Undecodable, crop_aspect, decode_image
from tests.helpers.imagezoo import base_picture, png_bytes, twins


def test_every_good_kind_decodes_to_8bit_rgb(zoo):
    root, good, _ = zoo
    for rel in good:
        im = decode_image(root / rel)
        assert im.mode == "RGB", rel
        assert np.asarray(im).dtype == np.uint8


def test_broken_files_raise_with_their_reason(zoo):
    root, _, bad = zoo
    for rel, reason in bad.items():
        with pytest.raises(Undecodable) as e:
            decode_image(root / rel)
        assert e.value.reason == reason, rel


def test_twins_decode_to_identical_pixels():
    base = base_picture(3)
    for name, data in twins(base).items():
        assert np.array_equal(np.asarray(decode_image(data)), base), name


def test_16bit_and_float_scaled_not_saturated():
    gray = np.arange(256, dtype=np.uint16).reshape(16, 16)
    out16 = np.asarray(decode_image(png_bytes(gray * 257, 16)))[..., 0]
    assert np.array_equal(out16, gray.astype(np.uint8))
    as_float = Image.fromarray(gray.astype(np.float32) / 255.0, "F")
    outf = np.asarray(decode_image(as_float))[..., 0]
    assert np.abs(outf.astype(int) - gray).max() <= 1
    big_float = Image.fromarray(gray.astype(np.float32) * 10.0, "F")  # range 0..2550: scaled by its max
    assert np.asarray(decode_image(big_float))[..., 0].max() == 255
    assert len(np.unique(np.asarray(decode_image(big_float)))) > 200


def test_transparency_over_white_and_palette_transparency():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    assert (np.asarray(decode_image(Image.fromarray(rgba, "RGBA"))) == 255).all()
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.info["transparency"] = 0
    assert (np.asarray(decode_image(p)) == 255).all()


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 0, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode_image(buf.getvalue()))
    assert px[..., 0].mean() > 150 and px[..., 2].mean() < 50


def test_bomb_refused_before_decoding():
    data = png_bytes(np.zeros((2, 2), np.uint8), 8, size=(30000, 30000))
    with pytest.raises(Undecodable) as e:
        decode_image(data, DecodeOptions())
    assert e.value.reason == "decompression-bomb"
    small_limit = DecodeOptions(max_pixels=100)
    with pytest.raises(Undecodable):
        decode_image(Image.new("RGB", (20, 20)), small_limit)


def test_extreme_aspect_ratio_does_not_blow_memory(tiny_clip):
    from rdm.embed.embedder import Embedder

    emb = Embedder.load(tiny_clip)
    strip = Image.new("RGB", (1, 20000), (120, 30, 200))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = emb.pixel_transform(strip)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert pixels.shape == (emb.image_size, emb.image_size, 3)
    assert grown_mb < 200, f"peak memory grew {grown_mb:.0f} MB"
    assert crop_aspect(strip, 2.0).size == (1, 2)


def test_centre_crop_keeps_the_pixels_that_survive_the_resize(tiny_clip):
    """Cropping an over-long image first gives (nearly) the same pixels as open_clip alone."""
    from rdm.embed.embedder import Embedder

    emb = Embedder.load(tiny_clip)
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (64, 64 * 6, 3), dtype=np.uint8))
    direct = np.asarray(emb.reference_pil_ops(wide), np.int16)
    cropped = emb.pixel_transform(wide).astype(np.int16)
    assert np.abs(direct - cropped).max() <= 2


@pytest.mark.parametrize("size,mode", [(32, "shortest"), (224, "shortest"), (224, "squash"), (336, "shortest")])
def test_torch_free_pixel_transform_matches_open_clip_exactly(size, mode):
    """rdm.images.pixels reproduces open_clip's Resize + CenterCrop pixel for pixel (workers skip importing torch)."""
    import open_clip

    from rdm.embed.embedder import _split_preprocess, pixel_transform_for

    ops = _split_preprocess(open_clip.image_transform(size, is_train=False, resize_mode=mode))[0]
    fast = pixel_transform_for({"size": size, "resize_mode": mode, "interpolation": "bicubic"}, ops)
    assert fast.fallback_ops is None
    rng = np.random.default_rng(size)
    for w, h in [(size, size), (size + 1, size), (640, 480), (480, 640), (97, 1000), (1000, 97), (33, 35), (3, 2)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if max(w, h) / min(w, h) > 2 and mode == "shortest":
            continue  # over-long images are centre-cut first (tested above)
        assert np.array_equal(fast(im), np.asarray(ops(im))), (w, h)
    longest = pixel_transform_for({"size": size, "resize_mode": "longest"}, ops)
    assert longest.fallback_ops is not None


def test_decoding_workers_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rdm.images.pixels, rdm.images.decode; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
