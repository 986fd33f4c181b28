"""The public assets `rdm pull` knows, where rdm keeps what it downloads, and how to make what is missing.

An asset is data (open_clip keeps its architectures as data the same way): a source URL, a rough
size, the CLIP its vectors or conditioning come from, and what it becomes once pulled:

  compvis-rdm768  the published 768x768 retrieval-augmented diffusion model (CompVis/latent-diffusion)
                  -> a model folder in $RDM_HOME/models/compvis-rdm768
  artbench        CompVis' ten ArtBench style databases (ViT-L/14 image embeddings, .npz)
                  -> databases artbench-art_nouveau, artbench-baroque, ... in the databases' home
  openimages      CompVis' OpenImages database (~11 GB of .npz) -> the database openimages

$RDM_HOME (default: the user's cache folder, e.g. ~/.cache/rdm) holds models/, downloads/ (partial
and finished downloads) and digests.json (the sha256 of each first download, see rdm.models.download).
This module imports nothing heavy: the store's error messages and the model chooser use it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RDMError

HOME_ENV = "RDM_HOME"  # rdm's own cache: models, downloads, recorded digests
MIRROR_ENV = "RDM_PULL_MIRROR"  # base URL of a mirror holding the assets' files under their own names
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo" / "rdm"  # bundled with the package
VIT_L_14 = "ViT-L-14:openai"  # CLIP ViT-L/14 (OpenAI), the CLIP of every published RDM asset
COMPVIS = "https://ommer-lab.com/files/rdm"
CONFIG_768 = ("https://raw.githubusercontent.com/CompVis/latent-diffusion/main/configs/"
              "retrieval-augmented-diffusion/768x768.yaml")
ARTBENCH_STYLES = ("art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism", "realism",
                   "renaissance", "romanticism", "surrealism", "ukiyo_e")


@dataclass(frozen=True)
class Asset:
    """One downloadable asset and what it becomes."""

    name: str  # what `rdm pull NAME` takes
    kind: str  # "model" (a CompVis checkpoint, converted) or "databases" (a zip of CompVis .npz files)
    url: str  # where its publisher serves it
    size: str  # rough download size, for the user (the server's Content-Length is what counts)
    about: str  # one line for `rdm pull --help` and errors
    clip: str = VIT_L_14  # the CLIP its vectors (databases) or its conditioning (models) come from
    sha256: str | None = None  # pinned digest; None: unknown, the first download's digest is recorded
    config_url: str | None = None  # models: the CompVis config.yaml
    databases: tuple[str, ...] = field(default_factory=tuple)  # databases: the names it makes

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def url_env(self) -> str:
        """Environment variable that points this asset at a mirror, e.g. RDM_PULL_URL_COMPVIS_RDM768."""
        return "RDM_PULL_URL_" + self.name.upper().replace("-", "_")


# The publisher gives no digests for these files, so none is pinned: `rdm pull` records the digest of
# the first download and refuses any later copy or mirror that differs (trust on first use).
ASSETS = {a.name: a for a in (
    Asset("compvis-rdm768", "model", f"{COMPVIS}/model.ckpt", "~5 GB",
          "CompVis' 768x768 retrieval-augmented diffusion model (1.4B parameters), converted to an rdm model",
          config_url=CONFIG_768),
    Asset("artbench", "databases", f"{COMPVIS}/artbench_databases.zip", "~82 MB",
          "CompVis' ten ArtBench style databases (ViT-L/14 image embeddings)",
          databases=tuple(f"artbench-{style}" for style in ARTBENCH_STYLES)),
    Asset("openimages", "databases", f"{COMPVIS}/openimages_database.zip", "~11 GB",
          "CompVis' OpenImages database (ViT-L/14 image embeddings)", databases=("openimages",)),
)}


def rdm_home() -> Path:
    """$RDM_HOME, else the user's cache folder + rdm (XDG on Linux, ~/Library/Caches, %LOCALAPPDATA%)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "rdm" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "rdm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "rdm"


def models_home() -> Path:
    """Where pulled models are installed: $RDM_HOME/models."""
    return rdm_home() / "models"


def downloads_home() -> Path:
    """Where downloads land (NAME.part while unfinished): $RDM_HOME/downloads."""
    return rdm_home() / "downloads"


def asset(name: str) -> Asset:
    """The registered asset `name`; a clear error listing the others."""
    if name not in ASSETS:
        raise RDMError(f"unknown asset '{name}'; rdm pull knows: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_for_database(name: str) -> Asset | None:
    """The asset whose pull makes the database `name`, if any."""
    return next((a for a in ASSETS.values() if name in a.databases), None)


def how_to_make(name: str) -> str | None:
    """The command that makes the database `name`, for a 'no such database' error; None if rdm cannot tell."""
    pulled = asset_for_database(name)
    if pulled is not None:
        return f"rdm pull {pulled.name}"
    if name == "wikiart":
        return "rdm build-index huggan/wikiart --name wikiart"
    return None


def installed_models() -> list[Path]:
    """Model folders rdm can choose from: $RDM_HOME/models/* (sorted), then the bundled demo model."""
    root = models_home()
    found = sorted(p for p in root.iterdir() if (p / "rdm_config.json").is_file()) if root.is_dir() else []
    return found + ([DEMO_MODEL] if (DEMO_MODEL / "rdm_config.json").is_file() else [])


def model_asset_for(clip: str) -> Asset | None:
    """The model asset conditioned on the CLIP `clip`, to name in 'no model for this database' errors."""
    return next((a for a in ASSETS.values() if a.kind == "model" and a.clip == clip), None)
