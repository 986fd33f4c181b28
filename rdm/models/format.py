"""The rdm model folder: diffusers components plus the few settings retrieval conditioning needs.

    MODEL/
      model_index.json            diffusers' index: {"_class_name": "RDMPipeline", "unet": [lib, class], ...}
      unet/                       config.json + diffusion_pytorch_model.safetensors (save_pretrained)
      vae/                        the same for the autoencoder; absent for pixel-space models
      scheduler/                  scheduler_config.json
      rdm_config.json             RDMConfig below, with the sampling settings the model was made for
      clip/                       optional: the model's own CLIP in open_clip's folder format, when the
                                  embedder id is `local-dir:clip` (relative ids resolve against the folder)
      null_context.safetensors    "null_context" (T, D), only when unconditional == "learned"

The layout follows diffusers' `DiffusionPipeline.save_pretrained`, so each component loads with its
own `from_pretrained`; `rdm_config.json` plays the part open_clip's model_configs play: the
architecture-independent facts as data. Weights are safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin, SchedulerMixin
from safetensors.torch import load_file, save_file

from ..errors import RDMError
from ..util.files import atomic_folder

FORMAT = "rdm-model"
FORMAT_VERSION = 1
UNCONDITIONAL_KINDS = ("zeros", "learned")
PREDICTION_TYPES = ("epsilon", "v_prediction")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
NULL_CONTEXT_NAME = "null_context.safetensors"
LOCAL_DIR = "local-dir:"


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a model was made for (rdm_config.json "sampling", as transformers' generation config).

    Every entry point (RDMPipeline, rdm sample / compare / score / serve and the page) uses them when the caller
    passes nothing. A model folder without a "sampling" entry, or with only some of the keys, falls back to these
    field defaults: CompVis' knn2img.py (DDIM, --ddim_steps 50, --scale 5.0, --ddim_eta 0). k is rdm_config's k.
    """

    scheduler: str | None = None  # None: the folder's own scheduler/ (DDIM for converted CompVis models)
    num_inference_steps: int = 50  # knn2img.py --ddim_steps
    guidance_scale: float = 5.0  # knn2img.py --scale
    guidance_rescale: float = 0.0  # Lin et al. 2024 section 3.4 (diffusers' guidance_rescale); 0: off
    style_scale: float | None = None  # the neighbours' own guidance scale; None: plain guidance
    eta: float = 0.0  # knn2img.py --ddim_eta

    def __post_init__(self):
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise RDMError(f"rdm config: sampling.num_inference_steps must be an integer >= 1, got "
                           f"{self.num_inference_steps!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise RDMError(f"rdm config: sampling.guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingDefaults":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d or {}) - names)
        if unknown:
            raise RDMError(f"rdm config: unknown sampling settings {unknown}; known: {sorted(names)}")
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_embedder_id(model_id: str, folder: str | Path | None) -> str:
    """A model's recorded CLIP id made loadable from anywhere: a relative `local-dir:` path is relative to the model
    folder (so a copied or moved folder that holds its CLIP loads), never to the working directory."""
    if folder is None or not model_id.startswith(LOCAL_DIR):
        return model_id
    path = Path(model_id[len(LOCAL_DIR):]).expanduser()
    return model_id if path.is_absolute() else LOCAL_DIR + str((Path(folder) / path).resolve())


@dataclass
class RDMConfig:
    """What a sampler must know beyond the diffusers components (rdm_config.json)."""

    embedder: dict  # the CLIP embedder, opaque: at least {"model": "ViT-L-14:openai", "dim": 768}
    embedding_dim: int  # D of the context tokens; equals the U-Net's cross_attention_dim
    resolution: int  # native image size in pixels
    latent_channels: int  # channels of the U-Net's input (VAE latents, or 3 in pixel space)
    latent_scale_factor: float = 1.0  # latents are multiplied by this before the U-Net; 1.0 in pixel space
    k: int = 4  # default number of retrieved neighbours
    query_token: bool = True  # the query's own embedding is the first context token: (B, 1+k, D)
    unconditional: str = "zeros"  # classifier-free guidance context: "zeros" or "learned" (null_context)
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" or "v_prediction"
    sampling: dict = field(default_factory=dict)  # SamplingDefaults the model was made for; missing keys fall back
    source: dict = field(default_factory=dict)  # provenance, e.g. converted from which checkpoint (sha256, ema)
    format: str = FORMAT  # always "rdm-model"
    format_version: int = FORMAT_VERSION  # bumped on incompatible changes of this file

    def __post_init__(self):
        if not isinstance(self.embedder, dict) or not {"model", "dim"} <= self.embedder.keys():
            raise RDMError(f"rdm config: embedder must be a dict with 'model' and 'dim', got {self.embedder!r}")
        if self.embedder["dim"] != self.embedding_dim:
            raise RDMError(f"rdm config: embedder dim {self.embedder['dim']} != embedding_dim {self.embedding_dim}")
        if self.unconditional not in UNCONDITIONAL_KINDS:
            raise RDMError(f"rdm config: unconditional must be one of {UNCONDITIONAL_KINDS}, "
                           f"got {self.unconditional!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise RDMError(f"rdm config: prediction_type must be one of {PREDICTION_TYPES}, "
                           f"got {self.prediction_type!r}")
        if self.k < 0:
            raise RDMError(f"rdm config: k must be >= 0, got {self.k}")
        SamplingDefaults.from_dict(self.sampling)  # refused here, not at the first sample

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model's sampling settings, the documented fallbacks where it records none."""
        return SamplingDefaults.from_dict(self.sampling)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> RDMConfig:
        if d.get("format") != FORMAT:
            raise RDMError(f"not an rdm model config: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise RDMError(f"rdm model format_version {d.get('format_version')!r} is not supported by this rdm "
                           f"(it reads version {FORMAT_VERSION}); upgrade rdm or re-convert the model")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RDMError(f"rdm model config has unknown fields {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise RDMError(f"rdm model config is incomplete: {e}") from e


def _library_entry(obj) -> list:
    """model_index.json entry [library, class] of a component, [None, None] when absent."""
    if obj is None:
        return [None, None]
    return [type(obj).__module__.split(".")[0], type(obj).__name__]


def _check_components(unet, vae, config: RDMConfig, null_context) -> None:
    """Refuse a folder whose parts disagree with each other."""
    if unet.config.cross_attention_dim != config.embedding_dim:
        raise RDMError(f"U-Net cross_attention_dim {unet.config.cross_attention_dim} != embedding_dim "
                       f"{config.embedding_dim}")
    if vae is not None and vae.config.latent_channels != config.latent_channels:
        raise RDMError(f"VAE latent_channels {vae.config.latent_channels} != latent_channels {config.latent_channels}")
    if (config.unconditional == "learned") != (null_context is not None):
        raise RDMError("a null_context tensor is required when unconditional == 'learned', and only then")
    if null_context is not None and (null_context.dim() != 2 or null_context.shape[1] != config.embedding_dim):
        raise RDMError(f"null_context must be (T, {config.embedding_dim}), got {tuple(null_context.shape)}")


def save_model_folder(path, unet, vae, scheduler, config: RDMConfig, null_context: torch.Tensor | None = None,
                      overwrite: bool = False) -> Path:
    """Write a complete model folder to `path` atomically (temp folder, then rename)."""
    path = Path(path)
    _check_components(unet, vae, config, null_context)
    if path.exists() and not path.is_dir():
        raise RDMError(f"{path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RDMError(f"{path} already exists and is not empty; remove it or pass overwrite=True")
    with atomic_folder(path) as tmp:
        index = {"_class_name": "RDMPipeline", "_diffusers_version": diffusers.__version__,
                 "unet": _library_entry(unet), "vae": _library_entry(vae), "scheduler": _library_entry(scheduler)}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "rdm_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if null_context is not None:
            save_file({"null_context": null_context.detach().float().cpu().contiguous()}, str(tmp / NULL_CONTEXT_NAME))
    return path


def read_rdm_config(path) -> RDMConfig:
    """The RDMConfig of a model folder."""
    file = Path(path) / "rdm_config.json"
    if not file.is_file():
        raise RDMError(f"{path} is not an rdm model folder: {file.name} is missing")
    try:
        return RDMConfig.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise RDMError(f"{file} is not valid JSON: {e}") from e


def _component_class(index: dict, name: str, base: type):
    """The diffusers class named by model_index.json for component `name`, or None if absent."""
    library, class_name = index.get(name) or [None, None]
    if class_name is None:
        return None
    cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RDMError(f"model_index.json names {library}.{class_name} for {name!r}; expected a diffusers "
                       f"{base.__name__}")
    return cls


def _required_files(path: Path, index: dict, config: RDMConfig) -> list[Path]:
    """Files a complete folder must hold, given its index and config."""
    files = [path / "unet" / "config.json", path / "unet" / WEIGHTS_NAME, path / "scheduler" / "scheduler_config.json"]
    if (index.get("vae") or [None, None])[1] is not None:
        files += [path / "vae" / "config.json", path / "vae" / WEIGHTS_NAME]
    if config.unconditional == "learned":
        files.append(path / NULL_CONTEXT_NAME)
    return files


def load_model_components(path, device=None, dtype: torch.dtype | None = None):
    """(unet, vae or None, scheduler, RDMConfig, null_context or None) of a model folder."""
    path = Path(path)
    if not path.is_dir():
        raise RDMError(f"model folder not found: {path}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise RDMError(f"{path} is not an rdm model folder: model_index.json is missing")
    index = json.loads(index_file.read_text())
    config = read_rdm_config(path)
    missing = [str(f.relative_to(path)) for f in _required_files(path, index, config) if not f.is_file()]
    if missing:
        raise RDMError(f"model folder {path} is incomplete: missing {', '.join(missing)}")

    def load(name, base):
        cls = _component_class(index, name, base)
        if cls is None:
            return None
        model = cls.from_pretrained(path, subfolder=name, use_safetensors=True, local_files_only=True,
                                    torch_dtype=dtype)
        return model.to(device).eval() if device is not None else model.eval()

    unet, vae = load("unet", ModelMixin), load("vae", ModelMixin)
    if unet is None:
        raise RDMError(f"model folder {path} is incomplete: model_index.json names no unet")
    scheduler = _component_class(index, "scheduler", SchedulerMixin).from_pretrained(path, subfolder="scheduler")
    null_context = None
    if config.unconditional == "learned":
        null_context = load_file(str(path / NULL_CONTEXT_NAME))["null_context"].to(device=device, dtype=dtype)
    return unet, vae, scheduler, config, null_context


def model_fingerprint(path) -> str:
    """sha256 over the folder's safetensors files in sorted order, each preceded by its relative path."""
    path = Path(path)
    files = sorted(path.rglob("*.safetensors"), key=lambda f: f.relative_to(path).as_posix())
    if not files:
        raise RDMError(f"{path} holds no safetensors weights to fingerprint")
    from ..util.files import sha256_files

    return sha256_files(path, files)
