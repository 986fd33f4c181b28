"""The CLIP embedder: any open_clip model -> L2-normalised float32 vectors for images and text.

Model ids (`--clip`):
  NAME:TAG           an open_clip architecture and pretrained tag, e.g. ``ViT-L-14:openai`` (default,
                     the CLIP of the published RDM); ``NAME:/path/weights.bin`` loads a file instead;
  hf-hub:ORG/REPO    an open_clip model on the Hugging Face hub;
  local-dir:PATH     open_clip's folder format (open_clip_config.json + open_clip_model.safetensors).

Weights are resolved *before* open_clip builds the model: open_clip retries a failed download for
about a minute, and for ``hf-hub:`` ids it even falls back to random weights with only a warning.
Offline with nothing cached we fail in well under a second with a message that says what to do.

The embedder's `identity` (model id, weights checksum, dim, preprocessing) is recorded by every
database and checked by models, so vectors from different CLIPs are never mixed.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict, dataclass, field  # noqa: F401
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import huggingface_hub
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image
from torchvision import transforms as T

from ..errors import EmbedderUnavailable, RDMError
from ..images.pixels import PixelTransform
from .identity import DEFAULT_CLIP, EmbedderIdentity, IdentityOnly, _norm_pre, local_dir_canonical  # noqa: F401 (re-exported)

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BF16_MAX_COSINE_ERROR = 1e-2  # the fastest dtype must stay within this cosine distance of float32
HUB_PROBE_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------
# Resolving weights (fast, offline-aware)
# ---------------------------------------------------------------------------------------------

def _offline_help(model_id: str, why: str) -> EmbedderUnavailable:
    return EmbedderUnavailable(
        f"cannot load CLIP '{model_id}': {why}.\n"
        "  The weights are not in the local cache and could not be downloaded. Either run once with a\n"
        "  network connection (they are cached under ~/.cache/huggingface), or point at local weights:\n"
        "    --clip local-dir:PATH         a folder with open_clip_config.json + open_clip_model.safetensors\n"
        "    --clip ARCH:/path/weights.bin an open_clip architecture with a weights file\n"
        "  (HF_HOME / HF_HUB_CACHE select another cache.)"
    )


def _hub_file(repo: str, filename: str, model_id: str) -> str | None:
    """Path of repo/filename from the HF cache, downloading it if the hub answers; None if absent there."""
    cached = huggingface_hub.try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    if cached is not None:  # the hub said before that this file does not exist
        return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise _offline_help(model_id, "HF_HUB_OFFLINE is set")
    url = huggingface_hub.hf_hub_url(repo, filename)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    except huggingface_hub.errors.EntryNotFoundError:
        return None
    except huggingface_hub.errors.RepositoryNotFoundError as e:
        raise EmbedderUnavailable(f"cannot load CLIP '{model_id}': no such hub repository '{repo}'") from e
    except Exception as e:  # connection refused, DNS failure, timeout, proxy errors
        raise _offline_help(model_id, f"the hub is unreachable ({type(e).__name__}: {e})") from None
    return huggingface_hub.hf_hub_download(repo, filename)


def _resolve_hf_repo(repo: str, model_id: str) -> Path:
    """Local snapshot folder holding open_clip_config.json and the weights of an hf-hub model."""
    config = _hub_file(repo, "open_clip_config.json", model_id)
    if config is None:
        raise EmbedderUnavailable(f"'{model_id}' has no open_clip_config.json: not an open_clip model")
    for name in HF_WEIGHT_FILES:
        weights = _hub_file(repo, name, model_id)
        if weights is not None:
            return Path(config).parent
    raise EmbedderUnavailable(f"'{model_id}' has no open_clip weights ({', '.join(HF_WEIGHT_FILES)})")


def _resolve_tag(arch: str, tag: str, model_id: str) -> None:
    """Make sure the weights of an open_clip pretrained tag are cached (download if reachable)."""
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise EmbedderUnavailable(
            f"unknown CLIP '{model_id}': '{tag}' is neither a pretrained tag of {arch} "
            f"({', '.join(tags) or 'none'}) nor an existing weights file")
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for name in ([filename] if filename else list(HF_WEIGHT_FILES)):
            if _hub_file(repo, name, model_id) is not None:
                return
        raise EmbedderUnavailable(f"cannot load CLIP '{model_id}': weights not found in hub repo {repo}")
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if not cached.is_file():
        raise _offline_help(model_id, f"{cached} is missing and URL downloads are not probed offline")


def parse_model_id(model_id: str) -> tuple[str, str, str | None]:
    """Split a model id into (kind, name, tag): kind is 'local-dir', 'hf-hub' or 'tag'."""
    if not model_id or not model_id.strip():
        raise RDMError("empty CLIP model id; use e.g. ViT-L-14:openai, hf-hub:ORG/REPO or local-dir:PATH")
    if model_id.startswith("local-dir:"):
        return "local-dir", model_id[len("local-dir:"):], None
    if model_id.startswith("hf-hub:"):
        return "hf-hub", model_id[len("hf-hub:"):], None
    name, sep, tag = model_id.partition(":")
    if not sep or not tag:
        raise RDMError(f"CLIP id '{model_id}' needs a pretrained tag or weights file, e.g. {name}:openai")
    if name not in open_clip.list_models():
        raise RDMError(f"unknown open_clip architecture '{name}' (see open_clip.list_models())")
    return "tag", name, tag


def _create(model_id: str) -> tuple[torch.nn.Module, Callable, Any, str, str]:
    """Build (model, eval preprocess, tokenizer, canonical id, architecture) from a model id."""
    kind, name, tag = parse_model_id(model_id)
    if kind == "local-dir":
        path = Path(name).expanduser().resolve()
        if not (path / "open_clip_config.json").is_file():
            raise EmbedderUnavailable(
                f"cannot load CLIP '{model_id}': {path} has no open_clip_config.json "
                "(expected open_clip's folder format: open_clip_config.json + open_clip_model.safetensors)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) and not any(path.glob("*.pth")):
            raise EmbedderUnavailable(f"cannot load CLIP '{model_id}': no weights file in {path}")
        open_id = canonical = local_dir_canonical(model_id)  # the form identities record
        pretrained = None
    elif kind == "hf-hub":
        snapshot = _resolve_hf_repo(name, model_id)
        open_id, canonical, pretrained = f"local-dir:{snapshot}", model_id, None
    else:
        if Path(tag).expanduser().is_file():
            pretrained = str(Path(tag).expanduser().resolve())
            canonical = f"{name}:{pretrained}"
        else:
            _resolve_tag(name, tag, model_id)
            pretrained, canonical = tag, model_id
        open_id = name
    model, _, preprocess = open_clip.create_model_and_transforms(open_id, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(open_id)
    cfg = open_clip.get_model_config(open_id) or {}
    arch = name if kind == "tag" else _summarise_arch(cfg)
    return model.eval(), preprocess, tokenizer, canonical, arch


def _summarise_arch(cfg: dict) -> str:
    v = cfg.get("vision_cfg", {})
    return (f"custom(embed_dim={cfg.get('embed_dim')}, vision={v.get('layers')}x{v.get('width')}"
            f"/p{v.get('patch_size')}@{v.get('image_size')})")


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over the float32 state dict in sorted key order (file-format independent)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _split_preprocess(preprocess: T.Compose) -> tuple[T.Compose, tuple, tuple]:
    """Split open_clip's eval transform into its PIL part (for workers) and its ToTensor/Normalize."""
    ops = list(preprocess.transforms)
    cut = next(i for i, t in enumerate(ops) if isinstance(t, T.ToTensor))
    norm = next(t for t in ops[cut:] if isinstance(t, T.Normalize))
    return T.Compose(ops[:cut]), tuple(norm.mean), tuple(norm.std)


def pixel_transform_for(pre: dict, pil_ops: T.Compose) -> PixelTransform:
    """rdm.images.pixels' torch-free transform for square 'shortest'/'squash' preprocessing, else open_clip's ops."""
    size = pre.get("size", 224)
    square = not isinstance(size, (list, tuple)) or size[0] == size[1]
    side = int(size[0] if isinstance(size, (list, tuple)) else size)
    mode, interp = pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic")
    if square and mode in ("shortest", "squash") and interp in ("bicubic", "bilinear"):
        return PixelTransform(side, mode, interp)
    return PixelTransform(side, mode, interp, fallback_ops=pil_ops)


def pick_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA; bfloat16 on CPUs with native bf16 (AVX512-BF16 / AMX); else float32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def _probe_images(size: int, n: int = 4) -> np.ndarray:
    """Deterministic probe images (noise and gradients) used to validate a reduced dtype."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    yy, xx = np.meshgrid(ramp, ramp, indexing="ij")
    imgs[0] = np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)
    return imgs


class Embedder:
    """An open_clip model ready to embed images and text in batches."""

    def __init__(self, model: torch.nn.Module, preprocess: T.Compose, tokenizer: Any, identity: EmbedderIdentity,
                 device: torch.device, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.dtype = dtype
        pil_ops, mean, std = _split_preprocess(preprocess)
        self.reference_pil_ops = pil_ops  # open_clip's own resize/crop, which pixel_transform reproduces
        self.pixel_transform = pixel_transform_for(identity.preprocess, pil_ops)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def image_size(self) -> int:
        size = self.identity.preprocess.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @classmethod
    def load(cls, model_id: str = DEFAULT_CLIP, device: str | torch.device | None = None,
             dtype: str | torch.dtype = "auto") -> "Embedder":
        """Load an open_clip model by id; dtype 'auto' picks the fastest one that stays within 1e-2 cosine."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, preprocess, tokenizer, canonical, arch = _create(model_id)
        checksum = weights_checksum(model)
        pre = dict(open_clip.get_model_preprocess_cfg(model))
        pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pre.items()}
        with torch.inference_mode():
            dim = int(model.encode_text(tokenizer(["probe"])).shape[-1])
        identity = EmbedderIdentity(model=canonical, architecture=arch, weights_sha256=checksum, dim=dim,
                                    preprocess=pre)
        model = model.to(device)
        emb = cls(model, preprocess, tokenizer, identity, device, torch.float32)
        target = pick_dtype(device) if dtype == "auto" else _parse_dtype(dtype)
        if target != torch.float32:
            emb._switch_dtype(target, validate=(dtype == "auto" and device.type == "cpu"))
        return emb

    def _switch_dtype(self, dtype: torch.dtype, validate: bool) -> None:
        """Cast weights to dtype; with validate, keep float32 unless probes agree within 1e-2 cosine."""
        if not validate:
            self.model = self.model.to(dtype)
            self.dtype = dtype
            return
        probes = _probe_images(self.image_size)
        texts = ["a photo of a cat", "an abstract painting in blue"]
        ref_i, ref_t = self.encode_pixels(probes), self.encode_text(texts)
        fp32_model = self.model
        self.model, self.dtype = copy.deepcopy(fp32_model).to(dtype), dtype
        low_i, low_t = self.encode_pixels(probes), self.encode_text(texts)
        err = 1.0 - min((ref_i * low_i).sum(1).min(), (ref_t * low_t).sum(1).min())
        if err > BF16_MAX_COSINE_ERROR:
            self.model, self.dtype = fp32_model, torch.float32
        del fp32_model

    # -- embedding ---------------------------------------------------------------------------
    def _finish(self, feats: torch.Tensor) -> np.ndarray:
        feats = F.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) already resized/cropped by `pixel_transform` -> (N, D) unit vectors."""
        x = torch.as_tensor(pixels).to(self.device)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 pixels of shape (N, H, W, 3), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - self._mean) / self._std).to(self.dtype)
        return self._finish(self.model.encode_image(x))

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """PIL images (already decoded with rdm.images.decode) -> (N, D) unit vectors."""
        out = [self.encode_pixels(np.stack([self.pixel_transform(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_image_inputs(self, images: Sequence) -> tuple[np.ndarray, list[str]]:
        """Query images of any kind -> ((N, D) unit vectors, labels): paths and bytes are decoded exactly as
        database builds decode them (encode_image_files), PIL images get the same resize and crop."""
        vectors = np.zeros((len(images), self.dim), np.float32)
        files = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if files:
            vectors[files] = self.encode_image_files([images[i] for i in files])
        pil = [i for i, im in enumerate(images) if isinstance(im, Image.Image)]
        if pil:
            vectors[pil] = self.encode_images([images[i].convert("RGB") for i in pil])
        labels = [str(im) if not isinstance(im, (Image.Image, bytes)) else
                  (getattr(im, "filename", "") or f"image[{i}]") for i, im in enumerate(images)]
        return vectors, labels

    def encode_image_files(self, sources: Sequence, batch_size: int = 64) -> np.ndarray:
        """Image paths or encoded bytes -> (N, D) unit vectors, decoded exactly as database builds decode them
        (PixelTransform.load: the same JPEG draft scaling), so a database image queried by its file finds itself."""
        from ..images.decode import Undecodable

        pixels = []
        for src in sources:
            try:
                pixels.append(self.pixel_transform.load(src)[0])
            except Undecodable as e:
                label = src if isinstance(src, (str, os.PathLike)) else "uploaded image"
                raise RDMError(f"cannot read query image {label}: {e.reason} ({e.detail})") from None
        out = [self.encode_pixels(np.stack(pixels[i:i + batch_size])) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> (N, D) unit vectors."""
        texts = list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(self._finish(self.model.encode_text(tokens)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise RDMError(f"unknown dtype '{dtype}': use auto, float32, float16 or bfloat16")
    return table[dtype]


@lru_cache(maxsize=4)
def load_cached(model_id: str, device: str | None = None, dtype: str = "auto") -> Embedder:
    """Load an embedder by model id once per process (databases, queries and training share it)."""
    return Embedder.load(model_id, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Vectors made elsewhere: the identity without the weights
# ---------------------------------------------------------------------------------------------

def identity_only(model_id: str, dim: int) -> IdentityOnly:
    """The identity of CLIP `model_id` making `dim`-d vectors, without loading or downloading weights.

    The id is checked as far as open_clip knows it offline: the architecture and pretrained tag
    must exist, and the architecture's embedding size must be `dim`.
    """
    kind, name, tag = parse_model_id(model_id)
    canonical, arch = model_id, "unknown"
    if kind == "local-dir":
        canonical = local_dir_canonical(model_id)
    elif kind == "tag":
        arch = name
        if Path(tag).expanduser().is_file():
            canonical = f"{name}:{Path(tag).expanduser().resolve()}"
        elif not get_pretrained_cfg(name, tag):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise RDMError(f"unknown CLIP '{model_id}': '{tag}' is neither a pretrained tag of {name} "
                           f"({', '.join(tags) or 'none'}) nor an existing weights file")
        made = (open_clip.get_model_config(name) or {}).get("embed_dim")
        if made is not None and made != dim:
            raise RDMError(f"{model_id} makes {made}-d vectors, but these are {dim}-d: give the CLIP that made them")
    return IdentityOnly(EmbedderIdentity(model=canonical, architecture=arch, weights_sha256=None, dim=int(dim)))


def weights_on_this_machine(model_id: str) -> bool:
    """True when loading `model_id` needs no download: a local folder or file, or weights in the caches."""
    kind, name, tag = parse_model_id(model_id)
    if kind == "local-dir":
        path = Path(name).expanduser()
        return (path / "open_clip_config.json").is_file() and any(
            any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth"))
    if kind == "hf-hub":
        return (isinstance(huggingface_hub.try_to_load_from_cache(name, "open_clip_config.json"), str)
                and any(isinstance(huggingface_hub.try_to_load_from_cache(name, f), str) for f in HF_WEIGHT_FILES))
    if Path(tag).expanduser().is_file():
        return True
    cfg = get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        return any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str)
                   for f in ([filename] if filename else HF_WEIGHT_FILES))
    url = cfg.get("url", "")
    return bool(url) and (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)).is_file()


def embedder_for_vectors(model_id: str, dim: int,
                         load: Callable[[str], Embedder] | None = None) -> Embedder | IdentityOnly:
    """What records precomputed `dim`-d vectors: the CLIP itself (full identity, weights checksum) when
    its weights are on this machine, else `identity_only` (nothing is downloaded to embed nothing).

    `load` loads a model id (default: `load_cached` on the CPU in float32).
    """
    if not weights_on_this_machine(model_id):
        return identity_only(model_id, dim)
    embedder = (load or (lambda m: load_cached(m, "cpu", "float32")))(model_id)
    if embedder.dim != dim:
        raise RDMError(f"{embedder.identity.model} makes {embedder.dim}-d vectors, but these are {dim}-d: "
                       "give the CLIP that made them")
    return embedder
