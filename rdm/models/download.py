"""Resumable, verified downloads: what `rdm pull` fetches lands whole and checked, or not at all.

`fetch(url, dest)`:
  - streams with `requests` into `dest.part` (a sidecar `dest.part.json` names the URL and the
    server's validator), so an interrupted download resumes with an HTTP `Range` request, in the
    same run (a dropped connection is retried while it makes progress) or in the next one;
    `If-Range` makes a server whose file changed send it whole instead of a spliced tail;
  - hashes while it writes, fsyncs, compares the sha256 with the expected one (when known) and
    only then `os.replace`s the file into place: a reader never finds a half or a wrong file;
  - shows a tqdm bar on a terminal only;
  - fails within seconds, with what to do, when the host cannot be reached (offline).
A local path or file:// URL (a copy fetched elsewhere) is copied in with the same checks.

`DigestBook` is trust on first use for files whose publisher gives no digest: the sha256 of the
first download is recorded ($RDM_HOME/digests.json) and every later copy or mirror must match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm.auto import tqdm

from ..errors import RDMError
from ..util.progress import enabled as progress_bars
from ..util import files

CONNECT_TIMEOUT_S = 5.0  # an unreachable host fails this fast (DNS failures fail at once)
READ_TIMEOUT_S = 60.0  # a stalled transfer counts as an interruption after this long
ATTEMPTS = 4  # attempts in a row that add no byte before giving up (progress resets the count)
BACKOFF_S = 0.5  # first pause between attempts, doubled each time up to 4 s
CHUNK = 1 << 20  # file reads
NET_CHUNK = 1 << 16  # network reads: a dropped connection loses at most the chunk being read


class DownloadError(RDMError):
    """A download failed: unreachable, refused, interrupted for good, or not the expected file."""


class DigestMismatch(DownloadError):
    """The downloaded file's sha256 is not the expected one (the file was not kept)."""

    def __init__(self, message: str, actual: str):
        super().__init__(message)
        self.actual = actual


@dataclass
class Fetched:
    """A finished, verified download."""

    path: Path
    sha256: str
    size: int
    resumed_from: int = 0  # bytes kept from an earlier, interrupted attempt


progress_enabled = progress_bars  # the one rule (rdm.util.progress)


def _bar(name: str, total: int | None, initial: int, progress: bool | None) -> tqdm:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not progress_enabled(progress), leave=False)


def is_local(url: str) -> bool:
    """True for a file path or file:// URL (a copy already on this machine)."""
    return urlparse(url).scheme in ("", "file") or (len(url) > 1 and url[1] == ":")  # C:\... on Windows


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    return Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()


def _check_digest(digest: str, expected: str | None, why: str, url: str) -> None:
    if expected is not None and digest != expected.lower():
        raise DigestMismatch(f"refusing {url}: its sha256 is {digest}, but {why} is {expected.lower()}; "
                             "the file was not kept", digest)


def _land(part: Path, dest: Path) -> None:
    """Make the finished .part the destination, atomically and durably."""
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    files.fsync_dir(dest.parent)


def fetch(url: str, dest: str | os.PathLike, expected_sha256: str | None = None, why: str = "the expected digest",
          progress: bool | None = None, offline_hint: str | None = None) -> Fetched:
    """Download `url` to `dest` (resuming `dest.part`), verified against `expected_sha256` when given.

    `why` says where the expected digest comes from, for the error when the file differs;
    `offline_hint` what to do instead, for the error when the host cannot be reached.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_local(url):
        return _copy_local(_local_path(url), dest, expected_sha256, why, progress)
    if urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {url}: only http(s) URLs and local files are supported")
    return _Transfer(url, dest, expected_sha256, why, progress, offline_hint).run()


def _copy_local(src: Path, dest: Path, expected: str | None, why: str, progress: bool | None) -> Fetched:
    """A copy fetched elsewhere: copied in through a .part with the same checks as a download."""
    if not src.is_file():
        raise DownloadError(f"{src} does not exist (give a URL or the path of a downloaded copy)")
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with open(src, "rb") as f, open(part, "wb") as out, _bar(dest.name, src.stat().st_size, 0, progress) as bar:
        while block := f.read(CHUNK):
            digest.update(block)
            out.write(block)
            bar.update(len(block))
    try:
        _check_digest(digest.hexdigest(), expected, why, str(src))
    except DigestMismatch:
        part.unlink(missing_ok=True)
        raise
    size = part.stat().st_size
    _land(part, dest)
    return Fetched(dest, digest.hexdigest(), size)


class _Transfer:
    """One resumable HTTP download of `url` into `dest` (see the module docstring)."""

    def __init__(self, url: str, dest: Path, expected: str | None, why: str, progress: bool | None,
                 offline_hint: str | None):
        self.url, self.dest, self.expected, self.why, self.progress = url, dest, expected, why, progress
        self.offline_hint = offline_hint
        self.part = dest.with_name(dest.name + ".part")
        self.sidecar = dest.with_name(dest.name + ".part.json")
        self.session = requests.Session()
        self.total: int | None = None
        self.validator: str | None = None  # ETag or Last-Modified of the file the .part belongs to
        self.reached = False  # the host answered once in this run: failures now are interruptions

    # -- the partial file ----------------------------------------------------------------------
    def _resumable_offset(self) -> int:
        """Bytes of an earlier attempt that may be kept: same URL (or a digest that checks the result)."""
        if not self.part.is_file():
            return 0
        try:
            side = json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            side = {}
        if side.get("url") != self.url and self.expected is None:
            return 0  # another source, and nothing would catch a spliced file
        self.validator, self.total = side.get("validator"), side.get("total")
        return self.part.stat().st_size

    def _restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def _save_sidecar(self) -> None:
        self.sidecar.write_text(json.dumps({"url": self.url, "validator": self.validator, "total": self.total}))

    # -- one request ---------------------------------------------------------------------------
    def _open(self, offset: int) -> tuple[requests.Response | None, int]:
        """A streaming response and the offset its body starts at (0 when the server sends it whole)."""
        headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, not of a gzip stream
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        try:
            response = self.session.get(self.url, stream=True, headers=headers,
                                        timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except (requests.ConnectionError, requests.Timeout) as e:
            if self.reached:
                raise _Interrupted(f"{type(e).__name__}") from None
            raise self._unreachable(e) from None
        self.reached = True
        if response.status_code == 416 and offset and self.total == offset:
            response.close()
            return None, offset  # the .part is already whole
        if response.status_code == 416:
            response.close()
            raise _Restart()
        if response.status_code >= 500:
            response.close()
            raise _Interrupted(f"HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            response.close()
            raise DownloadError(f"{self.url} answered HTTP {response.status_code} {response.reason}; check the URL "
                                "(--url, or the mirror it points at)")
        start = 0
        if response.status_code == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                response.close()
                raise _Restart()
            self.total = total
        else:
            length = response.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
        self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or self.validator
        return response, start

    def _unreachable(self, e: Exception) -> DownloadError:
        host = urlparse(self.url).netloc
        return DownloadError(f"cannot reach {host} to download {self.url} ({type(e).__name__})"
                             + (f"\n{self.offline_hint}" if self.offline_hint else ""))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Fetched:
        offset = self._resumable_offset()
        resumed_from = offset
        digest = _hash_prefix(self.part, offset)
        failures, last_error = 0, ""
        with _bar(self.dest.name, self.total, offset, self.progress) as bar:
            while self.total is None or offset < self.total or not self.part.is_file():
                attempt_start = offset
                try:
                    response, start = self._open(offset)
                    if response is None:
                        break  # the .part was already whole
                    if start != offset:  # the server sent the whole file (no ranges, or it changed)
                        self._restart()
                        offset, resumed_from, digest = 0, 0, hashlib.sha256()
                        bar.reset()
                    bar.total = self.total
                    self._save_sidecar()
                    offset = self._receive(response, offset, digest, bar)
                    if self.total is None:
                        break  # no length to check against: the server's end is the end
                    if offset < self.total:
                        raise _Interrupted(f"the connection closed at {offset} of {self.total} bytes", offset)
                except _Restart:
                    self._restart()
                    self.validator = None
                    offset, resumed_from, digest = 0, 0, hashlib.sha256()
                    bar.reset()
                    failures, last_error = failures + 1, "the server could not resume the partial file"
                except _Interrupted as e:
                    offset = e.offset if e.offset is not None else offset
                    failures = 0 if offset > attempt_start else failures + 1
                    last_error = str(e)
                else:
                    continue
                if failures >= ATTEMPTS:
                    raise DownloadError(
                        f"the download of {self.url} was interrupted ({last_error}) at {offset}"
                        + (f" of {self.total}" if self.total else "") + " bytes; the partial file is kept: run the "
                        "same rdm pull again to resume it")
                time.sleep(min(BACKOFF_S * 2 ** max(failures - 1, 0), 4.0))
        if self.total is not None and offset != self.total:
            self._restart()
            raise DownloadError(f"{self.url}: received {offset} bytes, more than the {self.total} announced; "
                                "the partial file was removed, try again")
        actual = digest.hexdigest()
        try:
            _check_digest(actual, self.expected, self.why, self.url)
        except DigestMismatch:
            self._restart()
            raise
        _land(self.part, self.dest)
        self.sidecar.unlink(missing_ok=True)
        return Fetched(self.dest, actual, self.dest.stat().st_size, resumed_from)

    def _receive(self, response: requests.Response, offset: int, digest, bar: tqdm) -> int:
        """Append the body to the .part from `offset`; return the new size (raises _Interrupted on a drop)."""
        with response, open(self.part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            try:
                for block in response.iter_content(NET_CHUNK):
                    out.write(block)
                    digest.update(block)
                    offset += len(block)
                    bar.update(len(block))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                raise _Interrupted(f"{type(e).__name__} after {offset} bytes", offset) from None
        return offset


class _Restart(Exception):
    """The partial file cannot be continued: start from byte 0."""


class _Interrupted(Exception):
    """The transfer stopped before the end of the file; it may be resumed."""

    def __init__(self, why: str, offset: int | None = None):
        super().__init__(why)
        self.offset = offset  # bytes in the .part when it stopped (None: unchanged)


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total size or None) of a Content-Range header 'bytes START-END/TOTAL'."""
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-")[0]), (None if total == "*" else int(total))
    except ValueError:
        raise _Restart() from None


def _hash_prefix(part: Path, size: int):
    """sha256 state over the first `size` bytes of the partial file (the part kept from before)."""
    digest = hashlib.sha256()
    if size:
        with open(part, "rb") as f:
            remaining = size
            while remaining and (block := f.read(min(CHUNK, remaining))):
                digest.update(block)
                remaining -= len(block)
    return digest


# --- Trust on first use -----------------------------------------------------------------------------

class DigestBook:
    """The sha256 of each file as first downloaded, by key (e.g. 'compvis-rdm768/model.ckpt')."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RDMError(f"{self.path} is unreadable ({e}); it records the digests of first downloads: "
                           "fix or remove it (then the next download is trusted again)") from None

    def get(self, key: str) -> dict | None:
        """{"sha256", "size", "url", "recorded"} of the first download of `key`, or None."""
        return self._read().get(key)

    def record(self, key: str, sha256: str, size: int, url: str) -> dict:
        """Remember `sha256` as the digest every later copy of `key` must have."""
        book = self._read()
        book[key] = {"sha256": sha256, "size": size, "url": url, "recorded": files.now()}
        files.atomic_write_json(self.path, book)
        return book[key]

