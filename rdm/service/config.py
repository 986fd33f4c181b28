"""What `rdm serve` binds to, what it serves, and every limit it enforces."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..sampling.copyguard import DEFAULT_THRESHOLD

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one service process; the defaults are safe on a laptop (loopback only, no URL fetching)."""

    host: str = "127.0.0.1"  # address to bind; anything but loopback needs allow_network
    port: int = 8000  # TCP port (0: any free port)
    model: str | None = None  # rdm model folder (default $RDM_MODEL)
    indexes: str | None = None  # databases' home (default $RDM_INDEXES or ./indexes)
    databases: tuple[str, ...] | None = None  # serve only these (names or folders); None: all in the home
    adapters: tuple[str, ...] = ()  # LoRA adapters (names or folders) requests may use; loaded once at start
    token: str | None = field(default=None, repr=False)  # takedown token (a key named "token", scope remove)
    keys: str | None = None  # keys file: API keys by SHA-256, with scopes and collections (rdm.service.access)
    anonymous: tuple[str, ...] = ()  # collections callers without a key may search and generate on ("*": all)
    session_key: str | None = field(default=None, repr=False)  # a key for this run (all scopes); serve makes one
    allow_network: bool = False  # accept generation and search from non-loopback clients
    allow_urls: bool = False  # fetch image_url queries (never from local or private addresses)
    url_deadline_s: float = 10.0  # a URL fetch (connect, headers, body) ends within this many seconds
    device: str | None = None  # cpu, cuda ... (default: cuda when present)
    dtype: str | None = None  # float32, float16 ... (default: rdm.sampling.generate.default_device)
    # -- input bounds ---------------------------------------------------------------------------
    max_upload_bytes: int = 8 * 1024 * 1024  # an uploaded or base64 image
    max_pixels: int = 40_000_000  # decoded image size; more is refused as a decompression bomb
    decode_budget_bytes: int = 2 * 1024**3  # bytes of decoding in flight across all requests (each image's cost estimated
    # from its header: pixels x bytes per pixel of its mode, rdm.images.budget); a decode that does not fit waits
    decode_wait_s: float = 10.0  # ... this long, then 503 + Retry-After; an image costing more than the budget: 413
    max_k: int = 32  # neighbours per generated image
    max_search_k: int = 200  # results per search
    max_steps: int = 150  # denoising steps
    max_images: int = 8  # images per generate request
    max_compare_rows: int = 6  # databases per compare request
    max_guidance: float = 30.0  # |guidance scale|
    max_prompt_chars: int = 1000
    # -- load -----------------------------------------------------------------------------------
    max_queue: int = 32  # jobs waiting or running; one more gets 429 + Retry-After
    fair_queue: bool = True  # serve the owners with jobs waiting in turn; False: first come, first served
    max_jobs_per_key: int = 8  # jobs one key (or anonymous address) may have waiting or running; a key's max_jobs wins
    max_connections: int = 64  # open connections and requests in flight; more are answered 503 (uvicorn)
    header_timeout_s: float = 10.0  # a connection's first request headers must arrive within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_batch: int = 8  # images per pipeline call
    abandon_after_s: float = 120.0  # a job nobody polled or streamed for this long is cancelled
    keep_jobs: int = 256  # finished jobs kept in memory (oldest dropped first)
    keep_result_bytes: int = 256 * 1024 * 1024  # PNG bytes kept in memory across finished jobs
    uploads_kept: int = 256  # uploaded query images kept (as embeddings only)
    upload_images_kept: int = 32  # uploaded images kept as pixels too, to restyle or inpaint (longest side capped)
    thumb_size: int = 160  # thumbnail side in pixels
    audit_log: str | None = None  # JSON lines: every takedown, key use and 401/403/413/429 refusal (rdm.service.audit)
    curate_max_items: int = 200_000  # the page's curation view runs rdm curate on a served database up to this size
    curate_show: int = 48  # duplicate groups and outliers a curation view lists (the counts are all of them)
    torch_threads: int | None = None  # torch intra-op threads for sampling (None: torch's default)
    copy_threshold: float = DEFAULT_THRESHOLD  # the copy guard's CLIP cosine (rdm.sampling.copyguard)
    # -- content credentials (rdm.sampling.credentials) --------------------------------------------------
    credentials: bool = True  # a signed C2PA manifest in every PNG served
    sign_key: str | None = None  # PEM key (default $RDM_SIGN_KEY; neither: rdm's local, untrusted identity)
    sign_cert: str | None = None  # PEM certificate chain, leaf first (default $RDM_SIGN_CERT)

    def binds_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
