"""LoRA adapters: a few MB that teach a model a new kind of collection, mixed by weight at sampling time.

An adapter is low-rank updates (Hu et al. 2021, LoRA) of some of the U-Net's linear and conv layers, made with
peft the way diffusers' training scripts do (`LoraConfig(r, lora_alpha, target_modules)`, `unet.add_adapter`),
trained by `rdm train --adapter NAME` and switched per request with `set_adapters` without reloading the base.

An adapter folder ($RDM_ADAPTERS/NAME, default $RDM_HOME/adapters/NAME):
    adapter_model.safetensors   the LoRA weights only (peft's state-dict keys, without the adapter's name)
    rdm_adapter.json            what they were made for: the base model's fingerprint, the database's, rank, alpha,
                                targets, steps, seed, and the weights' sha256 (checked at every load)

Adapters are untrusted files: the JSON is checked field by field, the weights are read with safetensors (no
pickle), their digest must match the record, and every tensor's name and shape must be one the recorded rank and
targets give on this model, or nothing is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..errors import RDMError

ADAPTERS_ENV = "RDM_ADAPTERS"  # where adapters live (default $RDM_HOME/adapters)
WEIGHTS_FILE, META_FILE = "adapter_model.safetensors", "rdm_adapter.json"
FORMAT, FORMAT_VERSION = "rdm-adapter", 2  # 2: "all" is every linear and conv layer (1: see TARGETS_V1)
READS_VERSIONS = (1, 2)
MAX_BYTES = 512 * 2**20  # an adapter larger than this is refused before it is read
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# --targets: which layers get a low-rank update (peft matches a module whose name ends with one of these)
TARGETS = {
    "cross-attention": tuple(f"attn2.{m}" for m in _ATTENTION),  # the layers that read the neighbours
    "attention": _ATTENTION,  # self- and cross-attention
    # every linear and conv layer of the U-Net: attention, transformer projections and feed-forwards, the ResNets'
    # convolutions, shortcuts and time projections, the down/upsamplers, the time embedding, conv_in and conv_out
    "all": _ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                         "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"),
}
# Version-1 records (rdm before format 2): "all" left out conv_in/conv_out, the shortcuts, the down/upsamplers and the
# time embedding; such adapters still load, with the layers they were made with.
TARGETS_V1 = {**TARGETS, "all": _ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                              "time_emb_proj")}


def target_modules(targets: str, format_version: int = FORMAT_VERSION) -> tuple[str, ...]:
    """The layer-name suffixes a TARGETS name covers in adapters of this record version."""
    if targets not in TARGETS:
        raise RDMError(f"--targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    return (TARGETS_V1 if format_version == 1 else TARGETS)[targets]


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder's record (rdm_adapter.json) and where it is."""

    name: str
    path: Path
    rank: int
    alpha: float
    targets: str  # a TARGETS name
    base_fingerprint: str  # rdm.models.format.model_fingerprint of the model it was trained on
    base_model: str  # that model's name (for messages only)
    database: str  # the collection it was trained on
    database_fingerprint: str
    steps: int
    seed: int
    sha256: str  # of adapter_model.safetensors
    bytes: int
    format_version: int = FORMAT_VERSION  # of its record: which layers its targets name covers

    def record(self, weight: float) -> dict:
        """What provenance keeps of an adapter in use (no server path)."""
        return {"name": self.name, "weight": weight, "sha256": self.sha256, "rank": self.rank,
                "targets": self.targets, "database": self.database, "database_fingerprint": self.database_fingerprint,
                "steps": self.steps}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def adapters_home() -> Path:
    """$RDM_ADAPTERS, else $RDM_HOME/adapters."""
    if os.environ.get(ADAPTERS_ENV):
        return Path(os.environ[ADAPTERS_ENV]).expanduser()
    from .assets import rdm_home

    return rdm_home() / "adapters"


BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "demo" / "adapters"  # shipped with rdm (the demo's)


def check_name(name: str) -> str:
    """An adapter name: letters, digits, '.', '_', '-' (a folder name, never a path)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise RDMError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                       "digit")
    return name


def lora_config(rank: int, alpha: float, targets: str, format_version: int = FORMAT_VERSION):
    """peft's LoraConfig for a rank, alpha and TARGETS name (Gaussian A, zero B: a new adapter changes nothing)."""
    from peft import LoraConfig

    modules = target_modules(targets, format_version)
    if not isinstance(rank, int) or not 1 <= rank <= 1024:
        raise RDMError(f"the adapter rank must be an integer in 1..1024, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise RDMError(f"the adapter's alpha must be a positive number, got {alpha!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), init_lora_weights="gaussian")


def attach(unet, rank: int, alpha: float, targets: str, adapter_name: str = "default") -> list:
    """Add a fresh trainable adapter to `unet` (base weights frozen); returns its trainable parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, targets), adapter_name=adapter_name)
    params = []
    for name, p in unet.named_parameters():
        if ".lora_" in name and f".{adapter_name}." in name:
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise RDMError(f"--targets {targets}: this U-Net has no layer named like {', '.join(TARGETS[targets])}")
    return params


def adapter_state(unet, adapter_name: str = "default") -> dict:
    """The adapter's weights as peft saves them (keys without the adapter's name), contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(folder: str | Path, unet, meta: dict, adapter_name: str = "default") -> AdapterInfo:
    """Write an adapter folder whole: into a temporary sibling, then renamed (a killed run leaves no half-adapter)."""
    from safetensors.torch import save_file

    from ..util.files import commit_folder, sha256_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an adapter folder is as readable as a model folder
    try:
        save_file(adapter_state(unet, adapter_name), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                  "sha256": sha256_file(tmp / WEIGHTS_FILE), "bytes": (tmp / WEIGHTS_FILE).stat().st_size}
        (tmp / META_FILE).write_text(json.dumps(record, indent=1) + "\n")
        commit_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_adapter(folder)


def publish(run_adapter: str | Path, name: str) -> Path:
    """Copy a run's finished adapter folder into adapters_home()/NAME, whole or not at all."""
    from ..util.files import commit_folder

    final = adapters_home() / check_name(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        for f in (WEIGHTS_FILE, META_FILE):
            shutil.copyfile(Path(run_adapter) / f, tmp / f)
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def locate(spec: str | Path) -> Path:
    """An adapter folder from a name in adapters_home() or a folder path."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if os.sep in spec or spec.startswith(".") or (path.is_dir() and not NAME_RE.match(spec)):
        if not path.is_dir():
            raise RDMError(f"adapter folder not found: {path}")
        return path
    for root in (adapters_home(), BUNDLED):  # the user's adapters first, then those shipped with rdm
        found = root / check_name(spec)
        if found.is_dir():
            return found
    if path.is_dir():
        return path
    known = ", ".join(a.name for a in list_adapters()) or "none"
    raise RDMError(f"no adapter named {spec!r} in {adapters_home()} (installed: {known}); train one with "
                   f"`rdm train --adapter {spec} ...` or give its folder")


def read_adapter(spec: str | Path) -> AdapterInfo:
    """An adapter folder's checked record (the weights' digest is checked when they are loaded)."""
    folder = locate(spec)
    meta_file, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_file.is_file() or not weights.is_file():
        raise RDMError(f"{folder} is not an adapter folder: it needs {WEIGHTS_FILE} and {META_FILE}")
    if meta_file.stat().st_size > 1 << 20:
        raise RDMError(f"{meta_file} is larger than 1 MB: not an adapter record")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RDMError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RDMError(f"{meta_file} is not an rdm adapter record (format {FORMAT!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READS_VERSIONS:
        raise RDMError(f"{meta_file} has format_version {version!r}; this rdm reads "
                       f"{', '.join(map(str, READS_VERSIONS))}")
    types = {"rank": int, "alpha": (int, float), "targets": str, "base_fingerprint": str, "base_model": str,
             "database": str, "database_fingerprint": str, "steps": int, "seed": int, "sha256": str, "bytes": int}
    bad = [k for k, t in types.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if bad:
        raise RDMError(f"{meta_file}: missing or malformed field(s) {', '.join(bad)}")
    lora_config(meta["rank"], meta["alpha"], meta["targets"], version)  # checks rank, alpha, targets
    size = weights.stat().st_size
    if size > MAX_BYTES or size != meta["bytes"]:
        raise RDMError(f"{weights} is {size} bytes; its record says {meta['bytes']} (and adapters are at most "
                       f"{MAX_BYTES >> 20} MB)")
    return AdapterInfo(name=folder.name, path=folder, format_version=version, **{k: meta[k] for k in types})


def list_adapters(home: str | Path | None = None) -> list[AdapterInfo | dict]:
    """The adapters in `home` (default adapters_home(), then those shipped with rdm that it does not shadow), by
    name; a damaged folder is listed with its error."""
    roots = [Path(home)] if home else [adapters_home(), BUNDLED]
    out, seen = [], set()
    for root in roots:
        for folder in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")) \
                if root.is_dir() else []:
            if folder.name in seen:
                continue
            seen.add(folder.name)
            try:
                out.append(read_adapter(folder))
            except RDMError as e:
                out.append({"name": folder.name, "error": str(e)})
    return out


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """NAME[:WEIGHT] -> (name, weight); the weight is a finite number (default 1)."""
    name, sep, weight = str(spec).rpartition(":")
    if not sep or not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", weight.strip()):
        return str(spec), 1.0
    value = float(weight)
    if not math.isfinite(value) or abs(value) > 100:
        raise RDMError(f"--adapter {spec}: the weight must be a number in [-100, 100]")
    return name, value


def load_weights(info: AdapterInfo) -> dict:
    """The adapter's tensors, after checking their digest against the record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..util.files import sha256_file

    weights = info.path / WEIGHTS_FILE
    if sha256_file(weights) != info.sha256:
        raise RDMError(f"{weights} does not match the sha256 its record gives: the file was changed or damaged")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RDMError(f"{weights} is not a readable safetensors file: {e}") from e


class AdapterSet:
    """The adapters loaded into one U-Net (each once, by digest) and which are active at what weight."""

    def __init__(self, unet, base_fingerprint: str | None, base_name: str | None = None):
        self.unet = unet
        self.base_fingerprint = base_fingerprint
        self.base_name = base_name
        self.loaded: dict[str, AdapterInfo] = {}  # peft adapter name -> info
        self.active: list[tuple[AdapterInfo, float]] = []
        self.loads = 0  # adapter files read and added to the U-Net (switching reads none)

    def _peft_name(self, info: AdapterInfo) -> str:
        return f"rdm_{info.sha256[:16]}"

    def load(self, spec: str | Path) -> AdapterInfo:
        """Load an adapter into the U-Net once (a later call with the same weights reuses it)."""
        info = read_adapter(spec)
        if self.base_fingerprint is None:
            raise RDMError("adapters need a model loaded from its folder (RDMPipeline.from_pretrained): its weights' "
                           "fingerprint says which adapters were made for it")
        if info.base_fingerprint != self.base_fingerprint:
            raise RDMError(f"adapter {info.name} was trained on model {info.base_model} (weights "
                           f"{info.base_fingerprint[:12]}), not on this one ({self.base_name or 'this model'}, "
                           f"{self.base_fingerprint[:12]}): a LoRA only fits the weights it was trained on; train one "
                           f"for this model with `rdm train --adapter NAME --init MODEL ...`")
        key = self._peft_name(info)
        if key in self.loaded:
            return self.loaded[key]
        state = load_weights(info)
        expected = self._expected_shapes(info)
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            extra = sorted(set(got) - set(expected))[:3]
            missing = sorted(set(expected) - set(got))[:3]
            wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:3]
            raise RDMError(f"adapter {info.name} does not fit this model's layers (rank {info.rank}, targets "
                           f"{info.targets}): unexpected {extra}, missing {missing}, wrong shape {wrong}")
        from peft.utils import set_peft_model_state_dict

        with warnings.catch_warnings():  # peft warns on every adapter after the first: several are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.unet.add_adapter(lora_config(info.rank, float(info.alpha), info.targets, info.format_version),
                                  adapter_name=key)
        try:
            set_peft_model_state_dict(self.unet, {k: v.to(self._dtype()) for k, v in state.items()},
                                      adapter_name=key)
        except Exception:
            self.unet.delete_adapters(key)
            raise
        self.unet.requires_grad_(False)
        self.loaded[key] = info
        self.loads += 1
        self._apply()  # a freshly added adapter is active in peft: restore the chosen set
        return info

    def _dtype(self):
        return next(self.unet.parameters()).dtype

    def _expected_shapes(self, info: AdapterInfo) -> dict:
        """The tensor names and shapes an adapter of this rank and these targets has on this U-Net."""
        import torch.nn as nn

        shapes, targets = {}, target_modules(info.targets, info.format_version)
        for name, module in self.unet.named_modules():
            if ".lora_" in name or ".base_layer" in name or name.endswith("base_layer"):
                continue
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, nn.Linear):
                a, b = (info.rank, base.in_features), (base.out_features, info.rank)
            elif isinstance(base, nn.Conv2d):
                a = (info.rank, base.in_channels // base.groups, *base.kernel_size)
                b = (base.out_channels, info.rank, 1, 1)
            else:
                continue
            shapes[f"{name}.lora_A.weight"], shapes[f"{name}.lora_B.weight"] = a, b
        return shapes

    def use(self, specs: Sequence[tuple[str | Path | AdapterInfo, float]] = ()) -> list[dict]:
        """Make exactly these adapters active at these weights (loading any not loaded yet; an AdapterInfo this set
        loaded is used as loaded, its folder not read again); () or all weights 0: the base model, bit for bit.
        Returns their provenance records."""
        chosen = []
        for spec, weight in specs:
            weight = float(weight)
            if not math.isfinite(weight):
                raise RDMError(f"adapter {spec}: the weight must be a finite number, got {weight}")
            loaded = isinstance(spec, AdapterInfo) and self._peft_name(spec) in self.loaded
            chosen.append((spec if loaded else self.load(spec), weight))  # a loaded AdapterInfo: no file read
        names = [self._peft_name(i) for i, _ in chosen]
        if len(set(names)) != len(names):
            raise RDMError("an adapter is named twice; give each once with its weight")
        self.active = chosen
        self._apply()
        return [info.record(w) for info, w in chosen]

    def _apply(self) -> None:
        if not self.loaded:
            return
        on = [(self._peft_name(i), w) for i, w in self.active if w != 0.0]
        if on:
            self.unet.enable_adapters()
            self.unet.set_adapters([n for n, _ in on], [w for _, w in on])
        else:
            self.unet.disable_adapters()  # the base layers alone: exactly the model without adapters

    def records(self) -> list[dict]:
        return [info.record(w) for info, w in self.active]
