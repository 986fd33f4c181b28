"""What `rdm sample`, `rdm compare` and `rdm score` are asked to do: the options and their defaults, defined once
(the CLI takes its defaults from here). Light to import: no torch, no diffusers."""

from __future__ import annotations

from dataclasses import dataclass

from .copyguard import DEFAULT_THRESHOLD

OUTPUTS = "outputs"  # where `rdm sample` writes (rdm.sampling.generate.sample's out)
SWAP_SEEDS = (0,)  # `rdm score --model`: the sampling seeds, the same for every database


@dataclass
class SampleOptions:
    """How to sample; shared by `rdm sample` and `rdm compare`."""

    k: int | None = None  # neighbours per query (default: the model's rdm_config.k)
    num_images: int = 1  # images per prompt; image i gets seed + i
    # sampler settings: None takes the model's (rdm.models.format.SamplingDefaults, recorded in its rdm_config.json)
    steps: int | None = None  # denoising steps
    guidance: float | None = None  # classifier-free guidance scale
    guidance_rescale: float | None = None  # diffusers' guidance_rescale (Lin et al. 2024, 3.4): 0 off, 0.7 typical
    style_scale: float | None = None  # the neighbours' own guidance scale (two-condition guidance)
    scheduler: str | None = None  # "ddim", "dpm++", "euler", ... or a diffusers class
    eta: float | None = None  # DDIM eta (CompVis --ddim_eta): 0 deterministic, 1 ancestral (DDPM-like) sampling
    seed: int | None = 0  # first image's seed (deterministic by default); None draws one at random (recorded)
    where: tuple[str, ...] = ()  # COLUMN=VALUE filters applied inside each search
    # control over the neighbours (rdm.sampling.conditioning.NeighbourControl, rdm.sampling.selection.Selection)
    diversity: float = 0.0  # maximal marginal relevance over over-fetched candidates: 0 nearest-k, 1 most novel
    dedup: float | None = None  # cosine above which candidates are duplicates (None: 0.95 with diversity, else off)
    max_per: tuple[str, ...] = ()  # COLUMN=N: at most N neighbours sharing a value of COLUMN
    neighbour_weights: str = "uniform"  # uniform | database (each neighbour its --db weight) | score (s_i / s_1)
    negative_dbs: tuple[str, ...] = ()  # databases whose neighbours the sample is guided away from
    negative_refs: tuple[str, ...] = ()  # images the sample is guided away from
    negative_prompt: str | None = None  # text the sample is guided away from
    content_subtract: float = 0.0  # neighbours minus this times the query's embedding (InstantStyle); 0 off
    neighbour_window: str | None = None  # START:END fractions of the schedule in which the neighbours act
    height: int | None = None  # pixels (default: the model's resolution)
    width: int | None = None  # pixels (default: the model's resolution)
    # editing (rdm.sampling.editing): restyle an image, inpaint a masked region, outpaint a larger canvas
    init_image: str | None = None  # the image to restyle or edit (without a prompt, its CLIP embedding is the query)
    strength: float | None = None  # 0 returns the input, 1 ignores it (default 0.8; 1 when outpainting)
    mask: str | None = None  # white = redraw; everything else is kept
    mask_feather: float = 0.0  # a soft edge of this many pixels inside the mask
    extend: str | None = None  # LEFT,TOP,RIGHT,BOTTOM pixels added around the input (outpainting)
    aspect: str | None = None  # W:H the input is grown to (outpainting)
    # content credentials (rdm.sampling.credentials): a C2PA manifest in every PNG, signed with the operator's identity
    credentials: bool = True  # embed it (False: the JSON sidecar only)
    sign_key: str | None = None  # PEM private key (default $RDM_SIGN_KEY; neither: rdm's local, untrusted identity)
    sign_cert: str | None = None  # PEM certificate chain, leaf first (default $RDM_SIGN_CERT)
    # the copy guard (rdm.sampling.copyguard): each output compared with its neighbours and its collections' nearest items
    copy_guard: bool = True  # run it (False: no check, nothing recorded)
    copy_threshold: float = DEFAULT_THRESHOLD  # CLIP cosine at or above which an output is flagged a near-copy
    no_copies: bool = False  # refuse (do not write) flagged outputs, and fail
    # LoRA adapters (rdm.models.adapters): NAME[:WEIGHT] each, mixed by weight; () the base model
    adapters: tuple[str, ...] = ()
    progress: bool = True  # show a progress bar over the denoising steps


@dataclass(frozen=True)
class ScoreOptions:
    """What `score_images` measures and how."""

    k: int = 10  # neighbours per image over the union of the databases
    target: str | None = None  # the database the images should look like (its name); None: shares only
    prompt: str | None = None  # the content the images should show; None: no content score
    probe_max_per_database: int = 5000  # stored vectors per database the probe trains on (seeded sample)
    probe_holdout: float = 0.2  # share of them held out to measure the probe's own accuracy
    probe_l2: float = 1e-4  # weight decay of the probe
    seed: int = 0  # sampling and split of the probe's training vectors
    device: str | None = None  # the CLIP's device (default: cuda when present)


__all__ = ["OUTPUTS", "SWAP_SEEDS", "SampleOptions", "ScoreOptions"]
