"""Images in and out, all through rdm.images.decode (the path builds use): uploads, database items, URL queries.

- Uploads and base64 images are size-checked, then decoded by the embedder's PixelTransform.load
  (bombs, truncated files and HTML named .png become `Undecodable`, here a 400 naming the reason).
- Every decode (uploads, base64 and URL queries, database images) runs under the process's one
  DecodeBudget (rdm.images.budget): its cost, estimated from the header, must fit in
  `decode_budget_bytes` with the decodes in flight; it waits up to `decode_wait_s`, then 503 +
  Retry-After; an image costing more than the whole budget is refused at once (413).
- Database images are found by id in the metadata; the file is read only when its real path (links
  resolved) lies inside one of the database's source folders, then decoded and re-encoded as PNG:
  the bytes on disk are never sent as they are, so a file that is not an image cannot reach a browser.
- URLs are fetched only when the service was started with --allow-urls, only over http(s), never from
  a loopback, private, link-local or otherwise non-public address (checked on the address actually
  connected to), without redirects, within the upload size limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ..images.budget import BudgetBusy, DecodeBudget, OverBudget, read_header
from ..images.decode import DecodeOptions, Undecodable, decode_image
from ..images.pixels import PixelTransform
from .config import ServeConfig
from .validation import BadRequest

URL_TIMEOUT_S = 10.0


_BUDGETS: dict[int, DecodeBudget] = {}  # id(config) -> its budget, while the config lives
_BUDGETS_LOCK = threading.Lock()


def decode_budget(config: ServeConfig) -> DecodeBudget:
    """The one DecodeBudget of a service (of its config object): the Engine's uploads and render_file share it."""
    key = id(config)
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(key)
        if budget is None:
            budget = _BUDGETS[key] = DecodeBudget(config.decode_budget_bytes)
            weakref.finalize(config, _BUDGETS.pop, key, None)
        return budget


@contextlib.contextmanager
def budgeted(source, config: ServeConfig, budget: DecodeBudget | None = None, what: str = "this image",
             too_large: int = 413):
    """Hold the decode budget around one decode of `source` (its cost read from its header): 503 + Retry-After when
    the budget stays full for config.decode_wait_s, `too_large` (413) when the image alone costs more than the whole
    budget; an unreadable header raises Undecodable, as decoding it would."""
    budget = budget or decode_budget(config)
    header = read_header(source, DecodeOptions(max_pixels=config.max_pixels))
    try:
        lease = budget.acquire(header.cost, config.decode_wait_s)
    except OverBudget:
        raise BadRequest(too_large, f"{what} is too large to decode here: {header.describe()}, more than the "
                                    f"service's decode budget of {budget.budget / 1e6:,.0f} MB; send a smaller "
                                    "image (fewer pixels, or 8 bits per channel)") from None
    except BudgetBusy:
        raise BadRequest(503, f"the server is busy decoding other images: {what} ({header.describe()}) found no room "
                              f"within {config.decode_wait_s:g} s; retry in a moment", {"Retry-After": "2"}) from None
    try:
        with lease:
            yield header
    finally:
        if header.cost >= TRIM_AFTER_BYTES:  # a thumbnail's few MB are not worth a walk over the heap
            release_freed_memory()


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()
TRIM_AFTER_BYTES = 64 * 1024 * 1024  # decodes at least this costly hand their freed memory back when they end


def release_freed_memory() -> None:
    """Hand the memory a decode freed back to the system (glibc keeps freed blocks in per-thread arenas: ten decodes
    on ten threads would otherwise hold the peak of each, well past the decode budget)."""
    if _TRIM is not None:
        _TRIM(0)


def decode_query_image(data: bytes, transform: PixelTransform, config: ServeConfig,
                       budget: DecodeBudget | None = None) -> tuple[np.ndarray, tuple]:
    """Bytes of an image query -> the embedder's uint8 pixels (H, W, 3) and the original (width, height), decoded
    under the decode budget."""
    if len(data) > config.max_upload_bytes:
        raise BadRequest(413, f"image is larger than the upload limit of {config.max_upload_bytes} bytes")
    data = bytes(data)
    try:
        with budgeted(data, config, budget):
            return transform.load(data, DecodeOptions(max_pixels=config.max_pixels))
    except Undecodable as e:
        raise BadRequest(400, f"cannot use this image: {e.reason} ({e.detail or 'no detail'})") from None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageCache:
    """Re-encoded database images (thumbnails and full size), least recently used dropped first."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data


def render_file(path: Path, size: int | None, config: ServeConfig, budget: DecodeBudget | None = None) -> bytes:
    """A database image file (already checked to lie in its source folder) -> PNG bytes, fitted in size x size,
    decoded under the decode budget (one too large for the whole budget cannot be shown: 404)."""
    try:
        with budgeted(str(path), config, budget, what="the item's image", too_large=404):
            image = decode_image(str(path), DecodeOptions(max_pixels=config.max_pixels))
            if size:
                image.thumbnail((size, size), Image.Resampling.BICUBIC)
            return png_bytes(image)
    except Undecodable as e:
        raise BadRequest(404, f"the item's image cannot be shown: {e.reason}") from None


# --- URL queries (clip-retrieval's image_url) --------------------------------------------------------

def public_address(host: str, port: int) -> str:
    """The first address of host; BadRequest unless every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadRequest(400, f"cannot resolve {host}: {e}") from None
    addresses = [info[4][0] for info in infos]
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise BadRequest(403, f"refusing to fetch from {host}: it resolves to a non-public address ({ip})")
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with the certificate checked for the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def fetch_url(url: str, config: ServeConfig) -> bytes:
    """The bytes at an http(s) URL, under the rules in this module's docstring."""
    if not config.allow_urls:
        raise BadRequest(403, "this service does not fetch URLs (start it with --allow-urls); send the image itself "
                              "as base64 in 'image'")
    if not isinstance(url, str) or len(url) > 2048:
        raise BadRequest(400, "image_url must be a URL of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(400, f"image_url must be an http or https URL, got {url[:80]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = public_address(parts.hostname, port)
    conn_cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = conn_cls(parts.hostname, address, port, min(URL_TIMEOUT_S, config.url_deadline_s))
    cut = threading.Event()

    def cut_off():  # the overall deadline: a server trickling a byte at a time never hits a per-read timeout
        cut.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read

    watchdog = threading.Timer(config.url_deadline_s, cut_off)
    watchdog.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "rdm-serve", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            raise BadRequest(400, f"image_url answered HTTP {response.status} (redirects are not followed)")
        data = response.read(config.max_upload_bytes + 1)
    except (OSError, http.client.HTTPException, ValueError) as e:
        if cut.is_set():
            raise BadRequest(400, f"cannot fetch image_url: not complete within {config.url_deadline_s:g} s") from None
        raise BadRequest(400, f"cannot fetch image_url: {e}") from None
    finally:
        watchdog.cancel()
        conn.close()
    if cut.is_set():
        raise BadRequest(400, f"cannot fetch image_url: not complete within {config.url_deadline_s:g} s")
    if len(data) > config.max_upload_bytes:
        raise BadRequest(413, f"the image at image_url is larger than {config.max_upload_bytes} bytes")
    return data
