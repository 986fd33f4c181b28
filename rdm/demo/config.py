"""What `rdm demo` draws: every setting and its default, defined once (the CLI takes its defaults from here). Light to
import: no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RDMError
from .toyart import ALL_STYLES, STYLES

DEFAULT_PROMPTS = ("a red star", "a blue circle", "a green heart", "a yellow square")


@dataclass(frozen=True)
class DemoConfig:
    """What `rdm demo` draws; every field has a default that runs in minutes on two CPU cores."""

    out: str = "outputs/demo"  # folder for the toy art, the databases (OUT/indexes), the grid and its JSON
    model: str | None = None  # rdm model folder (default: the bundled demo model, rdm/assets/demo/rdm)
    clip: str | None = None  # CLIP id or folder (default: the bundled demo CLIP with the bundled model, else the
    #                          CLIP the --model records)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # content-only prompts, one group of columns each
    seeds: int = 2  # images per prompt; prompt p, image i gets seed `seed + p * seeds + i` in every row
    seed: int = 0  # first seed
    # sampler settings, as rdm sample's: None takes the model's (the bundled one records DDIM from t = T, 8 steps,
    # guidance 3; rdm.models.format.SamplingDefaults)
    steps: int | None = None  # denoising steps
    scheduler: str | None = None  # sampler (rdm.sampling.pipeline.SCHEDULER_ALIASES)
    guidance: float | None = None  # classifier-free guidance scale
    guidance_rescale: float | None = None  # diffusers' guidance_rescale (Lin et al. 2024, 3.4)
    eta: float | None = None  # DDIM eta: 0 deterministic (CompVis' default), 1 ancestral
    style_scale: float | None = None  # the neighbours' guidance scale (two-condition guidance)
    k: int | None = None  # neighbours per query (default: the model's)
    n_per_style: int = 48  # toy-art items per style database
    styles: tuple[str, ...] = STYLES  # one database (and grid row) per style
    thumbs: int = 3  # neighbour thumbnails at the start of each database row
    device: str | None = None  # cpu, cuda ... (default: cuda when present)
    threads: int | None = None  # torch CPU threads while the demo runs (None: auto_threads(), for this machine)
    adapters: tuple[str, ...] = ()  # LoRA adapters NAME[:WEIGHT] in every row (rdm.models.adapters); () the base model
    progress: bool = True  # progress bars over the denoising steps (on a terminal only)

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "styles", tuple(self.styles))
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise RDMError(f"the demo needs non-empty prompts, got {list(self.prompts)}")
        unknown = [s for s in self.styles if s not in ALL_STYLES]
        if unknown or not self.styles:
            raise RDMError(f"unknown toy-art styles {unknown or '(none given)'}; choose from {', '.join(ALL_STYLES)}")
        for name in ("seeds", "steps", "n_per_style", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RDMError(f"demo {name} must be at least 1, got {getattr(self, name)}")


__all__ = ["DEFAULT_PROMPTS", "DemoConfig"]
