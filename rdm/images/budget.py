"""What decoding an image will cost in memory, known from its header, and a budget for decodes running at once.

A 68 KB 16-bit 6000x6000 PNG costs ~0.94 GB to decode and convert to 8-bit RGB; a service that decodes
whatever it is sent, several at a time, needs to bound the sum. `decode_cost` estimates one image's peak
from what `Image.open` reads without decoding (size, mode, a PNG's tRNS); `DecodeBudget` admits decodes
while the costs in flight fit in a number of bytes, and makes the others wait (or refuses them).

This module imports only PIL (decoding workers import it without torch).
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from PIL import Image

from .decode import DecodeOptions, ImageInput, open_checked, undecodable_errors

# Peak memory growth of one decode, in bytes per pixel of the image as opened, by the cost class of its header
# (`cost_class`). Measured by scripts/measure_decode_cost.py: a 2000x2000 image of each kind (PNG, JPEG with and
# without EXIF rotation, TIFF, BMP, GIF, WebP; 16-bit PNGs written by hand), each decoded in a fresh process through
# both of the service's paths (rdm.service.images.decode_query_image, i.e. the embedder's PixelTransform.load, and
# Engine.editable_image); the growth of VmHWM (reset through /proc/self/clear_refs) over VmRSS just before, the larger
# of the two paths, divided by the pixels; the worst kind of each class + 2%, rounded up. Measured (Pillow 13.0,
# numpy 2.4): 1 5.96, L 5.96, L+tRNS 17.98, LA 19.99, P 17.99 (PNG, PNG+tRNS, GIF), RGB 8.00 (PNG, JPEG, TIFF, BMP,
# 16-bit PNG), RGB+tRNS 19.99, RGBA 15.98 (also 16-bit LA and RGBA PNGs, which open as RGBA), WebP 16.00 (RGB or
# RGBA), I;16 9.51 (PNG, TIFF; scaled to 8 bits in integers; 29.63 through float64 before), I 35.56, F 28.09,
# CMYK 7.97 (JPEG, TIFF).
DECODE_BYTES_PER_PIXEL = {
    "1": 7,
    "L": 7,
    "L+transparency": 19,  # converted through RGBA
    "LA": 21,
    "P": 19,
    "RGB": 9,
    "RGB+transparency": 21,
    "RGBA": 17,
    "WEBP": 17,
    "I;16": 10,  # 16-bit grey: scaled to 8 bits in integers, in place (rdm.images.decode._to_8bit)
    "I": 37,
    "F": 29,
    "CMYK": 9,
}
UNKNOWN_BYTES_PER_PIXEL = max(DECODE_BYTES_PER_PIXEL.values())  # a mode not measured: the worst measured
FIXED_COST = 1 << 20  # a floor per decode (decoder state, the small images of the resize): 1 MiB
MEASURED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "TIFF", "BMP")  # their decoders write the mode they open as


def cost_class(im: Image.Image) -> str:
    """The key of DECODE_BYTES_PER_PIXEL for an opened (not necessarily loaded) image; '?' when not measured."""
    mode = im.mode
    if im.format == "WEBP":
        return "WEBP"  # libwebp decodes into RGBA, whatever mode the image opens as
    if im.format is not None and im.format not in MEASURED_FORMATS:
        return "?"
    if mode.startswith("I;16"):
        return "I;16"
    if mode in ("L", "RGB") and "transparency" in im.info:
        return f"{mode}+transparency"  # converted through RGBA
    if mode in ("La", "PA"):
        return "LA"
    if mode == "RGBa":
        return "RGBA"
    return mode if mode in DECODE_BYTES_PER_PIXEL else "?"


def decode_cost(im: Image.Image) -> int:
    """Estimated peak bytes of decoding this (lazily opened) image and converting it to 8-bit RGB, from its header
    only: width x height x the bytes per pixel measured for its mode, plus FIXED_COST. JPEG draft scaling is not
    counted (an upper bound)."""
    w, h = im.size
    return w * h * DECODE_BYTES_PER_PIXEL.get(cost_class(im), UNKNOWN_BYTES_PER_PIXEL) + FIXED_COST


class Header(NamedTuple):
    width: int
    height: int
    mode: str
    cost: int  # decode_cost

    def describe(self) -> str:
        return f"{self.width}x{self.height} {self.mode}, about {self.cost / 1e6:,.0f} MB to decode"


def read_header(source: ImageInput, options: DecodeOptions | None = None) -> Header:
    """Size, mode and decode cost of an image from its header, with the decode path's own checks (bombs, empty sides,
    not an image: `Undecodable`); no pixel is decoded."""
    with undecodable_errors():
        im = open_checked(source, options or DecodeOptions())
        try:
            return Header(im.width, im.height, im.mode, decode_cost(im))
        finally:
            if im is not source:
                im.close()


# -- the budget -------------------------------------------------------------------------------------

class DecodeBudgetError(Exception):
    """A decode the budget did not admit; `cost` and `budget` in bytes."""

    def __init__(self, message: str, cost: int, budget: int):
        super().__init__(message)
        self.cost = cost
        self.budget = budget


class OverBudget(DecodeBudgetError):
    """The image alone costs more than the whole budget: it can never be admitted."""


class BudgetBusy(DecodeBudgetError):
    """Other decodes held the budget for the whole wait."""


class Lease:
    """Bytes held in a DecodeBudget until released (a context manager; releasing twice is harmless)."""

    def __init__(self, budget: DecodeBudget, cost: int):
        self.budget = budget
        self.cost = cost
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.budget._release(self.cost)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DecodeBudget:
    """Bytes of decoding in flight across threads, at most `budget`.

    `acquire(cost, timeout)` waits until `in_use + cost <= budget` and returns a Lease (use it in a `with`); an image
    whose cost alone exceeds the budget raises OverBudget at once, and a wait longer than `timeout` seconds raises
    BudgetBusy. Waiters are not served in order: one is admitted as soon as it fits, so a small image (a thumbnail)
    is not held up behind a large one; a large one that finds no room within its wait is refused and may retry.
    `peak` is the most bytes ever held at once.
    """

    def __init__(self, budget: int):
        if budget <= 0:
            raise ValueError(f"a decode budget must be positive, got {budget}")
        self.budget = int(budget)
        self.in_use = 0
        self.peak = 0
        self.admitted = 0  # leases granted
        self.waited = 0  # of which had to wait
        self.refused_busy = 0  # BudgetBusy raised
        self.refused_over = 0  # OverBudget raised
        self._cond = threading.Condition()

    def acquire(self, cost: int, timeout: float) -> Lease:
        cost = max(0, int(cost))
        with self._cond:
            if cost > self.budget:
                self.refused_over += 1
                raise OverBudget(f"{cost} bytes to decode, more than the whole budget of {self.budget}", cost,
                                 self.budget)
            if self.in_use + cost > self.budget:
                self.waited += 1
                deadline = time.monotonic() + max(0.0, timeout)
                while self.in_use + cost > self.budget:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.refused_busy += 1
                        raise BudgetBusy(f"{cost} bytes to decode did not fit within {timeout:g} s ({self.in_use} of "
                                         f"{self.budget} in use)", cost, self.budget)
                    self._cond.wait(left)
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
            self.admitted += 1
        return Lease(self, cost)

    def _release(self, cost: int) -> None:
        with self._cond:
            self.in_use -= cost
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"budget": self.budget, "in_use": self.in_use, "peak": self.peak, "admitted": self.admitted,
                    "waited": self.waited, "refused_busy": self.refused_busy, "refused_over": self.refused_over}
