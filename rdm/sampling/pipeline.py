"""RDMPipeline: retrieval-augmented latent diffusion as a diffusers pipeline.

    pipe = RDMPipeline.from_pretrained("models/rdm768")               # an rdm model folder (rdm.models.format)
    out = pipe("a lighthouse at dusk", databases="artbench-ukiyo_e", seed=1)
    out.images[0].save("lighthouse.png"); out.provenance[0]           # what made it

The query (a prompt's or an image's CLIP embedding) retrieves k neighbours from one or several
databases; [query, neighbours] are the U-Net's cross-attention context (rdm.sampling.conditioning), and DDIM
with classifier-free guidance denoises from seeded noise exactly as CompVis `scripts/knn2img.py` does
(the converted scheduler config reproduces `ldm/models/diffusion/ddim.py`; tests/test_pipeline.py
checks it against the original code's outputs).

Loading: diffusers' `DiffusionPipeline.from_pretrained` reads model_index.json (`_class_name`
"RDMPipeline", vae [null, null] for pixel-space models: `vae` is an optional component) and loads
unet, vae and scheduler; `RDMPipeline.from_pretrained` adds what diffusers does not know about,
rdm_config.json and the learned null context. `save_pretrained` writes the same folder format.
(`DiffusionPipeline.from_pretrained(path)` on the base class cannot load it: diffusers looks the
class name up in its own package.) The CLIP embedder is loaded lazily, from the id the model records,
on first use, and must match it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

from ..db.database import Database
from ..db.licence import attributions
from ..db.retrieval import Retriever, registry_for
from ..embed.embedder import Embedder
from ..errors import RDMError
from ..models.format import (
    NULL_CONTEXT_NAME,
    RDMConfig,
    SamplingDefaults,
    model_fingerprint,
    read_rdm_config,
    resolve_embedder_id,
    save_model_folder,
)
from . import attention, copyguard, editing
from . import conditioning as cond
from .copyguard import CopyGuard
from .provenance import Provenance, scheduler_record

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Scheduler names a user may type -> (diffusers class name, config overrides).
SCHEDULER_ALIASES = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),  # steps from t = T (Lin et al. 2024)
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),  # CompVis PLMSSampler
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}

ImageInput = Image.Image | str | Path


@dataclass
class RDMPipelineOutput(BaseOutput):
    """What RDMPipeline returns: the images and, for each, what made it."""

    images: Any  # list of PIL images | np (B, H, W, 3) in [0, 1] | torch (B, 3, H, W) in [0, 1] | latents
    provenance: list  # one rdm.sampling.provenance.Provenance per image
    latents: torch.Tensor  # (B, C, h, w) final latents, as the U-Net sees them (before / scale_factor)


# --- Small helpers ---------------------------------------------------------------------------------

def make_scheduler(name: str | None, base: SchedulerMixin) -> SchedulerMixin:
    """The scheduler to sample with: `base` (the model's, CompVis DDIM once converted) or one built from its config,
    which keeps the schedule the model was trained with (trained_schedule); a class that cannot is refused."""
    if name is None:
        return base
    class_name, overrides = SCHEDULER_ALIASES.get(name.lower(), (name, {}))
    compatible = {c.__name__: c for c in base.compatibles}
    if class_name not in compatible:
        raise RDMError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers class "
                       f"compatible with {type(base).__name__}: {', '.join(sorted(compatible))}")
    if type(base).__name__ == class_name and not overrides:
        return base
    takes = inspect.signature(compatible[class_name].__init__).parameters
    if base.config.get("clip_sample") and "clip_sample" not in takes and "thresholding" in takes:
        # x0 clipped to the image range, as the model's sampler does: thresholding with a ceiling of 1 clips
        overrides = {"thresholding": True, "sample_max_value": base.config.get("clip_sample_range", 1.0), **overrides}
    try:
        sampler = compatible[class_name].from_config(base.config, **overrides)
    except ImportError as e:  # diffusers' placeholder for a scheduler whose backend (LMS: scipy) is missing
        raise RDMError(f"scheduler '{name}' ({class_name}) needs a package that is not installed: "
                       f"{str(e).strip().splitlines()[0]} (pip install scipy for lms)") from None
    kept = trained_schedule(sampler)
    lost = [f"{key}={value!r}" for key, value in trained_schedule(base).items()
            if kept[key] != value and (key != "timestep_spacing" or value == "trailing")]  # trailing: zero SNR
    if lost:
        raise RDMError(f"scheduler '{name}' ({class_name}) cannot sample with the model's {', '.join(lost)}; use one "
                       f"that supports them, e.g. ddim, dpm++, euler, unipc or ddpm")
    return sampler


def check_sampler(sampler: SchedulerMixin, steps: int) -> None:
    """Refuse (RDMError) a sampler that cannot run `steps` steps, found by running a fresh copy of it over a tiny
    tensor (PNDM below its minimum of steps, LMS without scipy ...), so that a service says so before queueing."""
    import torch

    fresh = type(sampler).from_config(sampler.config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the samplers' own deprecation notes, repeated on every check
            fresh.set_timesteps(steps)
            x = torch.zeros(1, 1, 2, 2)
            for t in fresh.timesteps:
                x = fresh.scale_model_input(x, t)
                x = fresh.step(torch.zeros_like(x), t, x).prev_sample
    except Exception as e:  # noqa: BLE001 - any failure of the sampler's own code is a refusal of this setting
        raise RDMError(f"scheduler {type(sampler).__name__} cannot sample {steps} steps: {type(e).__name__}: {e}") \
            from None


def trained_schedule(scheduler: SchedulerMixin) -> dict:
    """The settings a sampler must share with training: prediction type, zero terminal SNR, timestep spacing
    (Lin et al. 2024). A scheduler class without a setting has its only behaviour (epsilon, no rescaling, None),
    even where from_config kept the model's value in its config."""
    takes = inspect.signature(type(scheduler).__init__).parameters
    own = lambda key, default: scheduler.config.get(key, default) if key in takes else default  # noqa: E731
    return {"prediction_type": own("prediction_type", "epsilon"),
            "rescale_betas_zero_snr": own("rescale_betas_zero_snr", False),
            "timestep_spacing": own("timestep_spacing", None)}


def as_list(x: Any) -> list:
    """None -> [], a single item -> [item], a list or tuple -> list."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [0, 1] -> PIL list (rounded to 8 bits as diffusers does; CompVis truncates) | np | torch."""
    images = images.float()
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return array if output_type == "np" else DiffusionPipeline.numpy_to_pil(array)


# --- The pipeline ----------------------------------------------------------------------------------

class RDMPipeline(DiffusionPipeline):
    """Retrieval-augmented diffusion: prompt or image -> neighbours from databases -> denoised image."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 rdm_config: RDMConfig | None = None, null_context: torch.Tensor | None = None,
                 embedder: Embedder | None = None):
        super().__init__()
        if rdm_config is None:
            raise RDMError("RDMPipeline needs the model's RDMConfig (rdm_config.json); load a model folder with "
                           "RDMPipeline.from_pretrained(PATH)")
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.rdm_config = rdm_config
        self.null_context = null_context  # (T, D) when rdm_config.unconditional == "learned"
        self._embedder = None
        if embedder is not None:
            self.embedder = embedder  # checked against the model's recorded embedder
        self._folder: Path | None = None
        self._fingerprint: str | None = None
        self._databases: dict[str, tuple[tuple, Database]] = {}  # resolved path -> (manifest stamp, Database)
        self._adapters = None  # rdm.models.adapters.AdapterSet, made on the first set_adapters

    # -- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, embedder: Embedder | None = None,
                        **kwargs) -> "RDMPipeline":
        """Load an rdm model folder (or a hub repo holding one); kwargs go to DiffusionPipeline.from_pretrained."""
        folder = Path(pretrained_model_name_or_path).expanduser()
        if not folder.is_dir():
            folder = _download(str(pretrained_model_name_or_path), kwargs)
        config = read_rdm_config(folder)
        null_context = None
        if config.unconditional == "learned":
            if not (folder / NULL_CONTEXT_NAME).is_file():
                raise RDMError(f"model folder {folder} is incomplete: missing {NULL_CONTEXT_NAME}")
            null_context = load_file(str(folder / NULL_CONTEXT_NAME))["null_context"]
        try:
            pipe = super().from_pretrained(folder, rdm_config=config, null_context=null_context, embedder=embedder,
                                           **kwargs)
        except (OSError, ValueError) as e:
            raise RDMError(f"cannot load the model folder {folder}: {e}") from e
        pipe._folder = folder.resolve()
        return pipe

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        """Write an rdm model folder (diffusers' layout plus rdm_config.json), replacing what is there."""
        if not safe_serialization or kwargs:
            raise RDMError(f"rdm model folders hold safetensors only; unsupported options: "
                           f"{', '.join(['safe_serialization=False'] * (not safe_serialization) + list(kwargs))}")
        save_model_folder(save_directory, self.unet, self.vae, self.scheduler, self.rdm_config, self.null_context,
                          overwrite=True)

    # -- properties -----------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (autoencoder levels - 1); 1 in pixel space."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def name_or_path(self) -> str | None:
        return str(self._folder) if self._folder else self.config.get("_name_or_path")

    @property
    def fingerprint(self) -> str | None:
        """sha256 of the model folder's weights (rdm.models.format.model_fingerprint); None if not loaded from one."""
        if self._fingerprint is None and self._folder is not None:
            self._fingerprint = model_fingerprint(self._folder)
        return self._fingerprint

    def set_adapters(self, adapters=()) -> list[dict]:
        """Sample with these LoRA adapters, [(name or folder, weight)], mixed by weight (rdm.models.adapters); () or all
        weights 0: the base model, bit for bit. Each is loaded into the U-Net once and kept: switching between
        requests reloads nothing. An adapter made for other base weights is refused. Returns their records."""
        if self._adapters is None and not adapters:
            return []
        return self._adapter_set().use(list(adapters))

    def load_adapter(self, spec):
        """Load a LoRA adapter (name or folder) into the U-Net without using it yet (rdm serve loads its adapters
        once at start); returns its rdm.models.adapters.AdapterInfo. Refused when made for other base weights."""
        return self._adapter_set().load(spec)

    def _adapter_set(self):
        if self._adapters is None:
            from ..models.adapters import AdapterSet

            self._adapters = AdapterSet(self.unet, self.fingerprint, self.name_or_path)
        return self._adapters

    @property
    def adapter_loads(self) -> int:
        """Adapter files read into the U-Net so far (switching between loaded adapters reads none)."""
        return self._adapters.loads if self._adapters is not None else 0

    @property
    def active_adapters(self) -> list[dict]:
        """The adapters in use and their weights, as provenance records them ([] for the base model)."""
        return self._adapters.records() if self._adapters is not None else []

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The settings the model was made for (rdm_config.json "sampling"); what __call__ uses for None."""
        return self.rdm_config.sampling_defaults

    @property
    def embedder(self) -> Embedder:
        """The CLIP the model was trained with, loaded on first use from the id in rdm_config.json (a relative
        local-dir path is relative to the model folder, not to the working directory)."""
        if self._embedder is None:
            from ..embed import load_embedder  # the CLIP is only needed for text/image queries and refs

            device = self._execution_device
            emb = load_embedder(resolve_embedder_id(self.rdm_config.embedder["model"], self._folder), str(device),
                                "float32" if device.type == "cpu" else "auto")
            self.embedder = emb
        return self._embedder

    @embedder.setter
    def embedder(self, emb: Embedder) -> None:
        expected = self.rdm_config.embedder
        if not cond.same_embedder(expected, emb.identity.to_dict()):
            raise RDMError(f"the model was trained with {cond.describe_embedder(expected)}, but the embedder is "
                           f"{cond.describe_embedder(emb.identity.to_dict())}")
        self._embedder = emb

    # -- steps of __call__ ----------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Pixels per side that every size must be a multiple of: the autoencoder's factor times the U-Net's
        downsampling (2 ** (down blocks - 1))."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def encode_pixels(self, image: Image.Image, batch: int, device) -> torch.Tensor:
        """An RGB image -> its latents (batch, C, h, w) in float32: the autoencoder's mode times the latent scale
        factor, or the pixels in [-1, 1] for a pixel-space model (exactly invertible by decode_latents)."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        x = x.to(device)
        if self.vae is not None:
            x = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().float() * self.rdm_config.latent_scale_factor
        return x.float().expand(batch, -1, -1, -1).contiguous()

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width), the model's native resolution by default; each a multiple of the VAE factor."""
        height = self.rdm_config.resolution if height is None else height
        width = self.rdm_config.resolution if width is None else width
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                nearest = max(f, round(v / f) * f) if isinstance(v, (int, float)) and v > 0 else f
                raise RDMError(f"{name} {v} is not a positive multiple of {f} (the autoencoder's downsampling "
                               f"factor); use e.g. {nearest}")
        return height, width

    def encode_query(self, prompts: list[str], images: list[ImageInput]) -> tuple[torch.Tensor, list[dict]]:
        """Prompts or images -> (P, D) CLIP unit vectors, with a provenance record for each query."""
        if prompts:
            return torch.from_numpy(self.embedder.encode_text(prompts)), [{"prompt": p} for p in prompts]
        vectors, labels = self.embedder.encode_image_inputs(images)  # decoded as database builds decode
        return torch.from_numpy(vectors), [{"image": label} for label in labels]

    def open_database(self, name: str, indexes=None) -> Retriever:
        """A database by name or folder from the registry `indexes` (or the default one of that home, $RDM_INDEXES
        or ./indexes): opened once per process, reopened after a writer commits; the pipeline keeps no cache."""
        return registry_for(indexes).get(name)

    def sources(self, databases, indexes=None) -> list[tuple[Retriever, float]]:
        """(retriever, weight) pairs from a name, 'name:weight', a Retriever (a Database, or anything with the
        rdm.db.retrieval.Retriever contract), or a list of those or of (retriever, weight) pairs."""
        items = databases if isinstance(databases, list) else [databases]
        out = []
        for item in items:
            db, weight = item if isinstance(item, tuple) else (item, None)
            if isinstance(db, (str, Path)):
                name, parsed = cond.parse_database_spec(str(db))
                db, weight = self.open_database(name, indexes), parsed if weight is None else weight
            if not isinstance(db, Retriever):
                raise RDMError(f"not a database: {db!r} (give a name, a Retriever such as a Database, or a "
                               "(retriever, weight) pair)")
            cond.check_embedder(self.rdm_config.embedder, db.identity.to_dict(), db.name)
            out.append((db, 1.0 if weight is None else float(weight)))
        return out

    def prepare_latents(self, sampler: SchedulerMixin, batch: int, height: int, width: int, generator,
                        latents: torch.Tensor | None, device) -> torch.Tensor:
        """Initial noise (B, C, h, w) in float32: given, or drawn from the generator(s) (diffusers' randn_tensor)."""
        shape = (batch, self.rdm_config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise RDMError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
        return latents.to(device=device, dtype=torch.float32) * sampler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]: decode(z / scale_factor), then (x + 1) / 2 clamped."""
        if self.vae is None:
            x = latents
        else:
            x = self.vae.decode((latents / self.rdm_config.latent_scale_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def negatives(self, control: cond.NeighbourControl, query: torch.Tensor | None, k: int, where,
                  indexes) -> dict | None:
        """What the sample is guided away from: {"neighbours": (P, k, D) negative neighbours (retrieved from the
        negative databases for each query, then the negative refs, cut or zero-padded to k), "prompt": (1, D)
        the negative prompt's embedding, "hits": per query the negatives used}; None when nothing is negative."""
        if not control.negatives and control.negative_prompt is None:
            return None
        out: dict = {"neighbours": None, "prompt": None, "hits": None}
        if control.negative_prompt is not None:
            if not control.negative_prompt.strip():
                raise RDMError("empty negative prompt")
            out["prompt"] = torch.from_numpy(self.embedder.encode_text([control.negative_prompt]))  # (1, D)
        if control.negatives:
            if query is None:
                raise RDMError("negative neighbours need a query to stand against")
            parts, hits = [], [[] for _ in range(len(query))]
            if control.negative_databases:
                found = cond.retrieve(query.numpy(), self.sources(control.negative_databases, indexes), max(k, 1),
                                      where)
                parts.append(found.embeddings)
                hits = [h + fh for h, fh in zip(hits, found.hits)]
            if control.negative_refs:
                vectors, labels = self.embedder.encode_image_inputs(list(control.negative_refs))
                parts.append(np.broadcast_to(vectors, (len(query), *vectors.shape)).astype(np.float32))
                hits = [h + [{"ref": label} for label in labels] for h in hits]
            embeddings = np.concatenate(parts, 1)
            out["neighbours"] = torch.from_numpy(cond.fit_to(embeddings, k))
            out["hits"] = [h[:k] for h in hits]
        return out

    def guidance_contexts(self, context: torch.Tensor, do_guidance: bool, style: bool, negatives: dict | None,
                          n: int) -> dict[str, torch.Tensor]:
        """The contexts of one U-Net call, {"in": inside the neighbours' window, "out": outside it}: the full context
        alone (no guidance); [unconditional, full] (guidance); [unconditional, query alone, full] (style guidance).
        Negative neighbours stand in the neighbour slots of the unconditional context (plain guidance) or of the
        query-alone one (style guidance); a negative prompt in the unconditional context's query slot. Outside
        the window the full context is the query alone."""
        query_alone = cond.query_only_context(context) if self.rdm_config.query_token else torch.zeros_like(context)
        if not do_guidance:
            return {"in": context, "out": query_alone}
        uncond = cond.unconditional_context(context, self.rdm_config.unconditional, self.null_context)
        against = query_alone
        if negatives is not None:
            neg = negatives["neighbours"]
            neg = None if neg is None else neg.repeat_interleave(n, 0).to(context)  # (B, k, D)
            if self.rdm_config.query_token and negatives["prompt"] is not None:
                uncond = uncond.clone()
                uncond[:, 0] = negatives["prompt"].to(context)
            if neg is not None and style:
                against = torch.cat([context[:, :1], neg], 1) if self.rdm_config.query_token else neg
            elif neg is not None:
                uncond = torch.cat([uncond[:, :1], neg], 1) if self.rdm_config.query_token else neg
        if not style:
            return {"in": torch.cat([uncond, context]), "out": torch.cat([uncond, query_alone])}
        return {"in": torch.cat([uncond, against, context]), "out": torch.cat([uncond, against, query_alone])}

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | list[ImageInput] | None = None,
        refs: list[ImageInput] | None = None,
        databases: Any = None,
        where: dict | list[str] | None = None,
        k: int | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        style_scale: float | None = None,
        scheduler: str | None = None,
        eta: float | None = None,
        guidance_rescale: float | None = None,
        control: cond.NeighbourControl | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        query_embeds: torch.Tensor | np.ndarray | None = None,
        neighbor_embeds: torch.Tensor | np.ndarray | cond.Neighbours | None = None,
        indexes: str | Path | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        return_dict: bool = True,
        init_image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | np.ndarray | None = None,
        mask_feather: float = 0.0,
        extend: tuple[int, int, int, int] | str | None = None,
        copy_guard: CopyGuard | None = CopyGuard(),
        copy_sources: Sequence[tuple[Any, float]] | None = None,
        aspect: float | str | None = None,
    ) -> RDMPipelineOutput | tuple:
        """Generate images conditioned on a query and its neighbours.

        Args:
            prompt: text query (or one per batch row); its CLIP text embedding is the query.
            image: image query (PIL or path, or a list); its CLIP image embedding is the query.
            refs: images used directly as every query's neighbours (no database); (image, weight) pairs weigh them.
            databases: None (the query alone), a name, "name:weight", a Database (any Retriever), or a list of
                those or of (database, weight) pairs: k neighbours are drawn from each in proportion.
            where: metadata filters applied inside each search ({"style": "neon"} or ["style=neon"]).
            k: neighbours per query from the databases (default: the model's rdm_config.k); refs are all used.
            num_images_per_prompt: images per query, each with its own seed.
            num_inference_steps: denoising steps. This and the other sampler settings (guidance_scale, eta,
                scheduler, style_scale, guidance_rescale) take the model's when None (`self.sampling_defaults`,
                rdm_config.json "sampling"; a model that records none: DDIM, 50, 5.0, 0.0 as CompVis knn2img.py, no
                style scale, no rescale).
            guidance_scale: classifier-free guidance scale.
            eta: DDIM's eta (0 deterministic, 1 ancestral).
            guidance_rescale: diffusers' guidance_rescale (Lin et al. 2024, section 3.4): the guided prediction's
                per-image standard deviation brought back towards the conditional one's, by this fraction; 0: off.
            style_scale: None (the model's; plain classifier-free guidance, one unconditional and one full context), or the
                neighbours' own guidance scale s_nn of two-condition guidance (rdm.sampling.conditioning.style_guided_noise):
                guidance_scale then weighs the query alone against the unconditional context and style_scale the
                neighbours against the query alone; 0 ignores the neighbours, guidance_scale equals plain guidance.
            scheduler: None (the model's: its recorded sampler, else its scheduler folder, CompVis DDIM once
                converted), "dpm++", an alias in SCHEDULER_ALIASES or a compatible diffusers scheduler class name.
            generator: noise source (a torch.Generator, or one per image).
            seed: seed s gives image i the seed s + i. Without a seed or a generator one is drawn from torch's
                global RNG and recorded.
            latents: initial noise (B, C, h, w) instead of drawing it.
            height: pixels, a multiple of the autoencoder factor (default: the model's resolution).
            width: pixels, likewise.
            output_type: "pil", "np" (B, H, W, 3), "pt" (B, 3, H, W), all in [0, 1], or "latent".
            query_embeds: (P, D) query embeddings instead of a prompt or image.
            neighbor_embeds: (P, k, D) neighbour embeddings instead of retrieval, or an rdm.sampling.conditioning.Neighbours
                retrieved beforehand (its records go to the provenance, its weights to the cross-attention).
            indexes: home of the databases named in `databases` (default $RDM_INDEXES or ./indexes).
            callback: called as callback(step, timestep, latents) after each denoising step.
            control: what is done with the neighbours (rdm.sampling.conditioning.NeighbourControl): diversity and
                duplicates at retrieval, per-neighbour weights (a log(w) bias on their cross-attention logits,
                rdm.sampling.attention), negative databases, refs or prompt in place of the unconditional context, content
                subtraction, the window of steps in which they act. None: plain retrieval conditioning.
            init_image: an image to restyle or edit (image-to-image): encoded (the autoencoder, or its pixels),
                noised to the step `strength` selects and denoised with the same conditioning. Without a prompt,
                image or query_embeds, its CLIP embedding is the query. Fitted to the model's size, aspect kept
                (or to height x width when given).
            strength: diffusers' semantics in [0, 1]: 0 returns the input through the autoencoder, 1 ignores it
                (text-to-image with the same seed); int(steps x strength) steps are run. Default 0.8, and 1 when
                outpainting.
            mask_image: inpainting: white (or opaque) = redraw, resized to the image if it differs; the rest is
                kept by blending the noised input in at every step and pasting its pixels back at the end.
            mask_feather: a soft edge of about this many pixels, inside the mask (outside it nothing changes).
            extend: outpainting: (left, top, right, bottom) pixels or "L,T,R,B" added around the input; the new
                border is inpainted.
            aspect: outpainting: a "W:H" aspect to grow the input to.
            copy_guard: the copy guard's thresholds (rdm.sampling.copyguard.CopyGuard); None skips it.
            copy_sources: the databases each output's nearest item is looked for in (default: those it retrieved
                from).
            return_dict: False returns (images, provenance) instead of an RDMPipelineOutput.
        """
        # 1. Check inputs; settings not given are the model's
        model_defaults = self.sampling_defaults
        num_inference_steps = model_defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = model_defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
        guidance_rescale = model_defaults.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        style_scale = model_defaults.style_scale if style_scale is None else style_scale
        scheduler = model_defaults.scheduler if scheduler is None else scheduler
        eta = model_defaults.eta if eta is None else eta
        control = control or cond.NeighbourControl()
        prompts, images = as_list(prompt), as_list(image)
        ref_images, ref_weights = split_weights(as_list(refs))
        if prompt is not None and not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise RDMError("empty prompt: give some text, or query by --image")
        given = [name for name, present in (("prompt", prompts), ("image", images),
                                            ("query_embeds", query_embeds is not None)) if present]
        retrieval = [name for name, present in (("databases", databases not in (None, [])), ("refs", ref_images),
                                                ("neighbor_embeds", neighbor_embeds is not None)) if present]
        if len(given) > 1:
            raise RDMError(f"give one kind of query, not {' and '.join(given)}")
        if not given and not retrieval and init_image is None:
            raise RDMError("nothing to condition on: give a prompt, an image or query_embeds")
        if len(retrieval) > 1:
            raise RDMError(f"give neighbours one way, not {' and '.join(retrieval)}")
        if output_type not in OUTPUT_TYPES:
            raise RDMError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_images_per_prompt < 1 or num_inference_steps < 1:
            raise RDMError("num_images_per_prompt and num_inference_steps must be at least 1")
        if k is not None and k < 0:
            raise RDMError(f"k must be >= 0, got {k}")
        if not (math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0):
            raise RDMError(f"guidance_rescale must be in [0, 1] (0: off; Lin et al. suggest 0.7), got {guidance_rescale}")
        if style_scale is not None and not (self.rdm_config.query_token and math.isfinite(style_scale)):
            raise RDMError(f"style_scale must be a finite number and the model must put the query first in its "
                           f"context (query_token); got {style_scale} for a model with query_token="
                           f"{self.rdm_config.query_token}")
        edit = None
        if init_image is not None:
            size = None if height is None and width is None else self.check_size(height, width)[::-1]
            edit = editing.prepare_edit(init_image, strength, mask_image, mask_feather, extend, aspect,
                                        resolution=self.rdm_config.resolution, multiple=self.size_multiple, size=size)
            height, width = edit.image.height, edit.image.width
            query_from = "prompt" if prompts else "image" if images else "embedding" if given else "init_image"
            if not given:  # the init image is the query
                images, given = [init_image], ["image"]
        elif strength is not None or mask_image is not None or extend is not None or aspect is not None:
            raise RDMError("strength, a mask, extend and aspect edit an image: give init_image (--init-image)")
        height, width = self.check_size(height, width)
        sampler = make_scheduler(scheduler, self.scheduler)
        sources = self.sources(databases, indexes) if "databases" in retrieval else []
        device, dtype = self._execution_device, self.unet.dtype
        dim = self.rdm_config.embedding_dim

        # 2. Encode the query: (P, D) from text, an image, or given embeddings
        if query_embeds is not None:
            query = torch.as_tensor(query_embeds, dtype=torch.float32).cpu()
            queries = [{"embedding": True} for _ in range(len(query))]
        elif prompts or images:
            query, queries = self.encode_query(prompts, images)
        else:  # a model conditioned on neighbours alone (query_token=False)
            count = len(neighbor_embeds) if neighbor_embeds is not None else 1
            query, queries = None, [{"neighbours_only": True} for _ in range(count)]
        if query is not None and (query.dim() != 2 or query.shape[1] != dim):
            raise RDMError(f"query embeddings must be (P, {dim}), got {tuple(query.shape)}")

        # 3. Neighbours: (P, k, D) retrieved from the databases, embedded refs, or given
        n_queries = len(queries)
        if sources:
            neighbours = cond.retrieve(query.numpy(), sources, self.rdm_config.k if k is None else k, where,
                                       control.selection)
        elif ref_images:
            if k not in (None, len(ref_images)):
                raise RDMError(f"every --ref image is a neighbour: k={k} does not apply to {len(ref_images)} refs")
            ref_vectors, labels = self.embedder.encode_image_inputs(ref_images)
            neighbours = cond.reference_neighbours(None if query is None else query.numpy(), ref_vectors, labels,
                                                   ref_weights)
        elif isinstance(neighbor_embeds, cond.Neighbours):  # retrieved beforehand, with records and weights
            if neighbor_embeds.embeddings.shape[0] != n_queries or neighbor_embeds.embeddings.shape[2] != dim:
                raise RDMError(f"neighbours must be ({n_queries}, k, {dim}), got "
                               f"{tuple(neighbor_embeds.embeddings.shape)}")
            neighbours = neighbor_embeds
        elif neighbor_embeds is not None:
            given_n = torch.as_tensor(neighbor_embeds, dtype=torch.float32).cpu().numpy()
            if given_n.ndim != 3 or given_n.shape[0] != n_queries or given_n.shape[2] != dim:
                raise RDMError(f"neighbor_embeds must be ({n_queries}, k, {dim}), got {tuple(given_n.shape)}")
            neighbours = cond.Neighbours(given_n, np.full(given_n.shape[:2], np.nan, np.float32),
                                         [[] for _ in range(n_queries)])
        else:
            neighbours = cond.Neighbours(np.zeros((n_queries, 0, dim), np.float32),
                                         np.zeros((n_queries, 0), np.float32), [[] for _ in range(n_queries)])

        neighbours = cond.neighbour_weights(neighbours, control.weighting)
        neighbours = cond.subtract_content(neighbours, None if query is None else query.numpy(),
                                           control.content_subtract)
        negatives = self.negatives(control, query, neighbours.k, where, indexes)  # what guidance pushes away from

        # 4. Context tokens (B, T, D) for each image, the unconditional context of the same shape, and the
        #    neighbours' logit bias (B, T)
        n = num_images_per_prompt
        batch = n_queries * n
        per_image = neighbours.repeat(n)
        query_b = None if query is None else query.repeat_interleave(n, dim=0)  # (B, D)
        context = cond.build_context(query_b, torch.from_numpy(per_image.embeddings), self.rdm_config.query_token)
        context = context.to(device=device, dtype=dtype)  # (B, T, D)
        do_guidance = guidance_scale != 1.0 or style_scale is not None  # CompVis knn2img.py: `if opt.scale != 1.0`
        contexts = self.guidance_contexts(context, do_guidance, style_scale is not None, negatives, n)
        copies = len(contexts["in"]) // batch  # 1, 2 (guidance) or 3 (style guidance) contexts per image
        bias = None
        if per_image.weighted:
            if (per_image.weights.sum(1) == 0).any() and not self.rdm_config.query_token:
                raise RDMError("every neighbour has weight 0, and this model is conditioned on neighbours only")
            w = torch.from_numpy(per_image.weights)
            bias = attention.weight_bias(torch.cat([torch.ones(batch, int(self.rdm_config.query_token)), w], 1))
            bias = torch.cat([torch.zeros((copies - 1) * batch, bias.shape[1]), bias]).to(device)  # the full context

        # 5. Prepare timesteps (image-to-image: the last int(steps x strength) of them, as diffusers)
        sampler.set_timesteps(num_inference_steps, device=device)
        timesteps = sampler.timesteps
        if edit is not None:
            run = min(int(num_inference_steps * edit.strength), num_inference_steps)
            start = (num_inference_steps - run) * sampler.order
            timesteps = timesteps[start:]
            if hasattr(sampler, "set_begin_index"):
                sampler.set_begin_index(start)

        # 6. Prepare the initial latents (B, C, h, w): one CPU generator per image seed; image-to-image: the init
        #    image's latents noised to the first step run (strength 1: the noise alone, as text-to-image)
        seeds = image_seeds(batch, seed, generator, latents)
        if seeds is not None:
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        given_latents = latents
        latents = self.prepare_latents(sampler, batch, height, width, generator, latents, device)
        init = mask = noise = None
        if edit is not None:
            init = self.encode_pixels(edit.image, batch, device)  # (B, C, h, w)
            noise = latents / sampler.init_noise_sigma if given_latents is None else given_latents.to(latents)
            if len(timesteps) == 0:
                latents = init.clone()
            elif run < num_inference_steps:
                latents = sampler.add_noise(init, noise, timesteps[:1].repeat(batch))
            if edit.mask is not None:
                m = torch.from_numpy(edit.mask)[None, None].to(device)
                mask = torch.nn.functional.interpolate(m, size=init.shape[-2:], mode="area")  # the latent grid

        # 7. Denoising loop: one batched U-Net call per step, guidance eps_u + s * (eps_c - eps_u) (or its
        #    two-condition form with style_scale); the latents stay float32 between steps, only the U-Net runs in
        #    the model's dtype
        step_kwargs = _step_kwargs(sampler, eta, generator)
        biased = attention.context_bias(self.unet) if bias is not None else contextlib.nullcontext()
        with self.progress_bar(total=len(timesteps)) as bar, biased:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents] * copies) if do_guidance else latents  # (copies * B, C, h, w)
                x = sampler.scale_model_input(x, t).to(dtype)
                inside = control.active(i, len(timesteps))  # the neighbours act in their window of steps only
                kwargs = {"context_bias": bias} if bias is not None and inside else None
                eps = self.unet(x, t, encoder_hidden_states=contexts["in" if inside else "out"],
                                cross_attention_kwargs=kwargs).sample.float()
                if style_scale is not None:
                    eps_u, eps_q, eps_c = eps.chunk(3)
                    eps = cond.style_guided_noise(eps_u, eps_q, eps_c, guidance_scale, style_scale)
                elif do_guidance:
                    eps_u, eps_c = eps.chunk(2)
                    eps = cond.guided_noise(eps_u, eps_c, guidance_scale)
                if do_guidance and guidance_rescale > 0:  # diffusers' own; skipped at 0, so 0 is bit-identical
                    eps = rescale_noise_cfg(eps, eps_c, guidance_rescale=guidance_rescale)
                latents = sampler.step(eps, t, latents, **step_kwargs).prev_sample
                if mask is not None:  # outside the mask: the input, noised to where the sample now is
                    kept = init if i == len(timesteps) - 1 else sampler.add_noise(
                        init, noise, timesteps[i + 1:i + 2].repeat(batch))
                    latents = (1 - mask) * kept + mask * latents
                if callback is not None:
                    callback(i, int(t), latents)
                bar.update()

        # 8. Decode (inpainting: the input's own pixels pasted back outside the mask), guard against copies, convert
        verdicts = [{} for _ in range(batch)]
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            if edit is not None and edit.mask is not None:
                original = torch.from_numpy(np.asarray(edit.image, np.float32) / 255.0).permute(2, 0, 1)[None]
                m = torch.from_numpy(edit.mask)[None, None]
                decoded = m.to(decoded) * decoded + (1 - m.to(decoded)) * original.to(decoded)
            images = to_output(decoded, output_type)
            if copy_guard is not None and self._embedder is None:  # embeddings given: no CLIP to compare with
                verdicts = [{"skipped": "no CLIP loaded (query and neighbours were given as embeddings)"}] * batch
            elif copy_guard is not None:
                pil = images if output_type == "pil" else to_output(decoded, "pil")
                verdicts = copyguard.check(pil, self.embedder, per_image.embeddings, per_image.hits,
                                           sources if copy_sources is None else copy_sources, copy_guard)

        # 9. Provenance, one record per image
        model = {"name_or_path": self.name_or_path, "fingerprint": self.fingerprint,
                 "embedder": self.rdm_config.embedder, "source": self.rdm_config.source,
                 **({"adapters": self.active_adapters} if self.active_adapters else {})}
        settings = scheduler_record(sampler, num_inference_steps, guidance_scale, eta, style_scale, guidance_rescale)
        records = [Provenance(
            query=queries[b // n], seed=None if seeds is None else seeds[b], model=model,
            databases=neighbours.drawn, neighbours=per_image.hits[b], scheduler=settings,
            size={"height": height, "width": width}, runtime={"device": str(device), "dtype": str(dtype)},
            where=cond.parse_where(where) if sources else {}, k=None if neighbor_embeds is not None else per_image.k,
            index=b, warnings=list(neighbours.notes), attributions=attributions(per_image.hits[b]),
            copy_guard=verdicts[b],
            control=control_record(control, negatives),
            edit={} if edit is None else {**edit.record(), "steps_run": len(timesteps), "query_from": query_from})
            for b in range(batch)]
        if not return_dict:
            return images, records
        return RDMPipelineOutput(images=images, provenance=records, latents=latents)


def split_weights(refs: list) -> tuple[list, list[float] | None]:
    """References as given ([image] or [(image, weight)]) -> (images, weights or None when none is weighed)."""
    images = [r[0] if isinstance(r, tuple) else r for r in refs]
    weights = [float(r[1]) if isinstance(r, tuple) else 1.0 for r in refs]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise RDMError(f"reference weights must be finite and >= 0, got {weights}")
    return images, weights if any(isinstance(r, tuple) for r in refs) else None


def control_record(control: cond.NeighbourControl, negatives: dict | None) -> dict:
    """The neighbour control of a sample, for its provenance ({} when it is plain retrieval conditioning)."""
    if control == cond.NeighbourControl() and negatives is None:
        return {}
    out = control.to_dict()
    named = [d[0] if isinstance(d, tuple) else d for d in as_list(control.negative_databases)]
    out["negative_databases"] = [getattr(d, "name", None) or str(d) for d in named]
    out["negative_refs"] = [str(r) if not isinstance(r, Image.Image) else "image" for r in control.negative_refs]
    if negatives is not None and negatives["hits"] is not None:
        out["negatives"] = negatives["hits"]
    return out


def image_seeds(batch: int, seed: int | Sequence[int] | None, generator, latents) -> list[int] | None:
    """Per-image seeds seed + i; drawn from torch's global RNG when none is given; None with a generator or latents."""
    if seed is not None and (generator is not None or latents is not None):
        raise RDMError("give a seed, a generator or latents, not several")
    if isinstance(seed, int):
        return [seed + i for i in range(batch)]
    if seed is not None:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise RDMError(f"{len(seeds)} seeds for {batch} images")
        return seeds
    if generator is None and latents is None:
        base = int(torch.randint(0, 2**31 - batch, ()).item())  # recorded, so the image can be remade
        return [base + i for i in range(batch)]
    return None


def _step_kwargs(scheduler: SchedulerMixin, eta: float, generator) -> dict:
    """eta and generator for schedulers whose step() takes them (diffusers' prepare_extra_step_kwargs), and DDIM's
    use_clipped_model_output wherever it clips x0.

    DDIM with x0 clipped (clip_sample, thresholding) but the model's own noise estimate kept (diffusers' default)
    steps to sqrt(a') x0_clipped + sqrt(1 - a') eps: a point no (x0, eps) pair of the current sample explains, so
    each step drops what the clip cut off and the next prediction starts from a sample off the model's path. With
    guidance on a zero-terminal-SNR v-prediction model the early x0 estimates overshoot [-1, 1] by far, and the
    drift grows with the number of steps: the bundled demo model held its style at 8 DDIM steps and lost it at 25
    and 50 (scripts/diagnose_sampler.py). use_clipped_model_output recomputes eps from the clipped x0, which makes
    the step consistent, as the x0-based samplers (DPM-Solver++ with thresholding, DDPM) are by construction."""
    params = inspect.signature(scheduler.step).parameters
    out = {}
    if "use_clipped_model_output" in params and (scheduler.config.get("clip_sample")
                                                 or scheduler.config.get("thresholding")):
        out["use_clipped_model_output"] = True
    if "eta" in params:
        out["eta"] = eta
    elif eta:
        warnings.warn(f"{type(scheduler).__name__} has no eta; ignoring eta={eta}", stacklevel=3)
    if "generator" in params and generator is not None:
        out["generator"] = generator
    return out


def _download(repo_id: str, kwargs: dict) -> Path:
    """A hub repository's snapshot folder (diffusers' own download does not know rdm_config.json)."""
    import huggingface_hub

    if repo_id.count("/") != 1 or Path(repo_id).exists():
        raise RDMError(f"model folder not found: {repo_id}")
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=kwargs.pop("revision", None), cache_dir=kwargs.pop("cache_dir", None),
            local_files_only=bool(kwargs.pop("local_files_only", False)) or huggingface_hub.constants.HF_HUB_OFFLINE))
    except Exception as e:  # offline, unknown repo, no access
        raise RDMError(f"model folder not found: {repo_id} is not a local folder and could not be fetched from the "
                       f"hub ({type(e).__name__}: {e})") from None


__all__ = ["RDMPipeline", "RDMPipelineOutput", "make_scheduler", "SCHEDULER_ALIASES"]
