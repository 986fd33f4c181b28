"""What `rdm sample`, `rdm compare` and `rdm convert` do, as functions a notebook can call too.

They load a model folder into an RDMPipeline, sample, and write what a person wants to keep: the
PNGs, a provenance JSON beside each (same stem), and labelled grids (rdm.images.sheets) that show which
neighbours conditioned which images.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import diffusers
import torch
from PIL import Image

from ..db import open_database
from ..embed import load_embedder
from ..embed.embedder import _parse_dtype
from ..errors import EmbedderUnavailable, RDMError
from ..images.sheets import grid
from ..models.assets import installed_models, model_asset_for, models_home
from ..models.convert.compvis import convert_compvis_checkpoint
from ..models.format import RDMConfig, read_rdm_config
from ..util.files import atomic_write
from .conditioning import (
    NeighbourControl,
    describe_embedder,
    parse_database_spec,
    parse_weighted,
    parse_window,
    same_embedder,
)
from .copyguard import DEFAULT_THRESHOLD, CopyGuard  # noqa: F401
from .options import OUTPUTS, SampleOptions
from .pipeline import RDMPipeline
from .provenance import write_json
from .selection import Selection, parse_max_per

MODEL_ENV = "RDM_MODEL"  # model folder used when --model is not given
NO_DATABASE = "none"  # --db none: condition on the query alone
GRID_TILE = 160  # pixels per grid tile


@dataclass
class SampleResult:
    """Files written by `sample`."""

    images: list[Path]  # one PNG per image
    provenance: list[Path]  # one JSON per image, same stem
    grid: Path  # neighbours beside the samples
    records: list[dict] = field(default_factory=list)  # the provenance records themselves
    near_copies: list[str] = field(default_factory=list)  # what the copy guard flagged, one line each


@dataclass
class ConvertResult:
    """What `convert` produced."""

    path: Path  # the model folder
    embedder: dict  # the embedder identity recorded in rdm_config.json
    note: str | None = None  # set when the CLIP could not be loaded and only its id and dim were recorded


# --- Models and databases --------------------------------------------------------------------------

def resolve_model(model: str | os.PathLike | None, databases: Sequence[str] = (), indexes: str | None = None) -> Path:
    """The model folder: the argument, else $RDM_MODEL, else the installed model made for the databases' CLIP."""
    chosen = model or os.environ.get(MODEL_ENV)
    if not chosen:
        return choose_model(databases, indexes)
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise RDMError(f"model folder not found: {path}")
    return path


def choose_model(databases: Sequence[str], indexes: str | None = None) -> Path:
    """The first installed model (rdm.models.assets.installed_models) whose CLIP made every database's vectors."""
    models = installed_models()
    if not databases:
        raise RDMError(f"no model given, and without a database there is no CLIP to choose one by: pass --model PATH "
                       f"or set ${MODEL_ENV} (installed: {', '.join(str(m) for m in models) or 'none'})")
    wanted = {name: open_database(name, indexes).identity.to_dict() for name in dict.fromkeys(databases)}
    for path in models:
        try:
            embedder = read_rdm_config(path).embedder
        except RDMError:
            continue  # a damaged folder is no candidate; naming it with --model shows why
        if all(same_embedder(embedder, identity) for identity in wanted.values()):
            return path
    name, identity = next(iter(wanted.items()))
    asset = model_asset_for(identity["model"])
    fix = (f"run `rdm pull {asset.name}` (the published model for {identity['model']})" if asset else
           f"train one on it (`rdm train --db {name} ...`)")
    raise RDMError(f"no model given, and no installed model was made for the CLIP of database {name}, "
                   f"{describe_embedder(identity)}: {fix}, or pass --model PATH or set ${MODEL_ENV} "
                   f"(looked in {models_home()} and the bundled demo model)")


def default_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 when present, else CPU in float32 (see scripts/bench_sampling.py for bfloat16 on CPU)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in (None, "auto"):
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, _parse_dtype(dtype)


def load_pipeline(model: str | os.PathLike | None, device: str | None = None, dtype: str | None = None,
                  progress: bool = True) -> RDMPipeline:
    """An RDMPipeline for a model folder on the default (or given) device and dtype."""
    path = resolve_model(model)
    dev, dt = default_device(device, dtype)
    was_enabled = diffusers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()  # no "Loading pipeline components" bar for three parts
    try:
        pipe = RDMPipeline.from_pretrained(path, dtype=dt)
    finally:
        if was_enabled:
            diffusers.utils.logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe.to(dev)


def parse_databases(specs: Sequence[str]) -> list[tuple[str, float]]:
    """--db values -> [(name, weight)]; [] for `--db none` (the query alone)."""
    specs = list(specs)
    if any(s.strip().lower() == NO_DATABASE for s in specs):
        if len(specs) > 1:
            raise RDMError("--db none conditions on the query alone; it cannot be combined with other databases")
        return []
    return [parse_database_spec(s) for s in specs]


def check_query(prompt: str | None, image: str | None, refs: Sequence[str], options: SampleOptions | None = None) -> None:
    """Refuse an empty prompt, no query at all, or edit settings without an image, before a model is loaded."""
    init = options.init_image if options is not None else None
    if prompt is not None and not prompt.strip():
        raise RDMError("empty prompt: give some text, or query by --image")
    if prompt is None and image is None and not refs and init is None:
        raise RDMError("give a PROMPT, an --image query, --ref images or an --init-image to restyle")
    if options is None:
        return
    if init is None and (options.strength is not None or options.mask or options.extend or options.aspect):
        raise RDMError("--strength, --mask, --extend and --aspect edit an image: give --init-image")
    for path, option in ((init, "--init-image"), (options.mask, "--mask")):
        if path is not None and not Path(path).is_file():
            raise RDMError(f"{option} {path}: no such image file")


# --- Files -----------------------------------------------------------------------------------------

def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe, lower-case rendering of a prompt ('A cat, at dusk!' -> 'a-cat-at-dusk')."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "sample"


def free_stem(folder: Path, stem: str, suffixes: Sequence[str] = (".png", ".json")) -> str:
    """`stem`, or `stem-2`, `stem-3` ... so that no existing file is overwritten."""
    candidate, n = stem, 1
    while any((folder / f"{candidate}{s}").exists() for s in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def save_png(image: Image.Image, path: Path, provenance: dict | None = None, identity=None) -> Path:
    """Save a PNG atomically and durably (rdm.util.files.atomic_write); with a provenance record and a signing identity,
    with its content credentials embedded (rdm.sampling.credentials)."""
    if provenance is None or identity is None:
        atomic_write(path, lambda f: image.save(f, format="PNG"))
        return path
    from . import credentials

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, credentials.embed(buf.getvalue(), provenance, identity, title=path.name))
    return path


def grid_record(records: Sequence[dict]) -> dict:
    """A grid's provenance for its credentials: the first image's settings, every image's neighbours and
    databases."""
    databases = {(d.get("name"), d.get("fingerprint")): d for r in records for d in r["databases"]}
    return {**records[0], "neighbours": [h for r in records for h in r["neighbours"]],
            "databases": list(databases.values())}


def signing_identity(options: SampleOptions):
    """The identity to sign content credentials with (None: credentials off)."""
    if not options.credentials:
        return None
    from .credentials import SigningIdentity

    return SigningIdentity.resolve(options.sign_key, options.sign_cert)


def neighbour_tiles(hits: Sequence[dict], limit: int | None = None) -> list[tuple[str | None, str]]:
    """Grid tiles (image path, caption) of the neighbours that conditioned an image."""
    tiles = []
    for h in list(hits)[:limit]:
        label = h.get("id") or Path(str(h.get("ref", ""))).name
        score = h.get("score")
        caption = str(label) + (f"\n{score:.3f}" if isinstance(score, float) else "")
        tiles.append((h.get("path") or h.get("ref"), caption))
    return tiles


def _query_label(prompt: str | None, image: str | None, options: SampleOptions | None = None) -> str:
    init = options.init_image if options is not None else None
    label = prompt if prompt else f"image {Path(image).name}" if image else "" if init else "refs"
    if init is not None:
        what = "outpaint" if options.extend or options.aspect else "inpaint" if options.mask else "restyle"
        strength = "" if options.strength is None else f" at {options.strength:g}"
        label = "\n".join(filter(None, (label, f"{what} {Path(init).name}{strength}")))
    return label


def _input_tiles(options: SampleOptions) -> list[tuple[str | None, str]]:
    """The grid tiles of an edit's input (and mask) before the neighbours."""
    tiles = [(options.init_image, "input")] if options.init_image else []
    return tiles + ([(options.mask, "mask")] if options.mask else [])


def _describe_databases(databases: Sequence[tuple[str, float]], refs: Sequence[str]) -> str:
    if refs:
        return f"refs: {len(refs)} image(s)"
    if not databases:
        return "no database"
    return ", ".join(name if weight == 1.0 else f"{name}:{weight:g}" for name, weight in databases)


def neighbour_control(options: SampleOptions) -> NeighbourControl:
    """The NeighbourControl of the options (NeighbourControl() when none is set: plain retrieval conditioning)."""
    return NeighbourControl(
        selection=Selection(diversity=options.diversity, dedup=options.dedup, max_per=parse_max_per(options.max_per)),
        weighting=options.neighbour_weights, negative_databases=list(options.negative_dbs) or None,
        negative_refs=tuple(_existing(r, "--negative-ref") for r in options.negative_refs),
        negative_prompt=options.negative_prompt, content_subtract=options.content_subtract,
        window=parse_window(options.neighbour_window))


def parse_ref(spec: str) -> tuple[str, float] | str:
    """'img.png:0.5' -> ('img.png', 0.5) (a weighted reference); 'img.png' -> 'img.png'."""
    if Path(spec).is_file():
        return spec
    path, weight = parse_weighted(spec)
    return (_existing(path, "--ref"), weight)


def _existing(path: str, option: str) -> str:
    if not Path(path).is_file():
        raise RDMError(f"{option} {path}: no such image file")
    return path


def _run(pipe: RDMPipeline, prompt: str | None, databases: list[tuple[str, float]], options: SampleOptions,
         image: str | None, refs: Sequence[str], indexes: str | None):
    """One pipeline call with the options; returns the PIL images and their provenance dicts."""
    use_adapters(pipe, options.adapters)
    out = pipe(prompt=prompt, image=image, refs=[parse_ref(r) for r in refs] or None, databases=databases or None,
               where=list(options.where) or None, k=options.k, num_images_per_prompt=options.num_images,
               num_inference_steps=options.steps, guidance_scale=options.guidance, style_scale=options.style_scale,
               scheduler=options.scheduler, eta=options.eta, guidance_rescale=options.guidance_rescale,
               seed=options.seed, height=options.height, width=options.width, output_type="pil", indexes=indexes,
               control=neighbour_control(options), init_image=options.init_image, strength=options.strength,
               mask_image=options.mask, mask_feather=options.mask_feather, extend=options.extend, aspect=options.aspect,
               copy_guard=CopyGuard(options.copy_threshold, refuse=options.no_copies) if options.copy_guard else None)
    return out.images, [p.to_dict() for p in out.provenance]


def use_adapters(pipe: RDMPipeline, specs: Sequence[str]) -> list[dict]:
    """Make the pipeline sample with these NAME[:WEIGHT] adapters (none: the base model)."""
    from ..models.adapters import parse_adapter_spec

    return pipe.set_adapters([parse_adapter_spec(spec) for spec in specs])


def near_copies(records: Sequence[dict]) -> list[str]:
    """One line per image the copy guard flagged."""
    lines = []
    for r in records:
        g = r.get("copy_guard") or {}
        if g.get("flagged"):
            near = g.get("nearest") or {}
            item = "/".join(str(near[k]) for k in ("database", "id", "ref") if k in near)
            pixels = "" if g.get("pixel_distance") is None else f", pixel distance {g['pixel_distance']:.3f}"
            lines.append(f"seed {r['seed']}: a near-copy of {item} (similarity {g['similarity']:.3f}{pixels}; "
                         f"threshold {g['threshold']:g})")
    return lines


# --- Commands --------------------------------------------------------------------------------------

def sample(prompt: str | None, model: str | None = None, databases: Sequence[str] = (),
           options: SampleOptions = SampleOptions(), image: str | None = None, refs: Sequence[str] = (),
           out: str | os.PathLike = OUTPUTS, indexes: str | None = None, device: str | None = None,
           dtype: str | None = None, pipe: RDMPipeline | None = None) -> SampleResult:
    """`rdm sample`: images for a prompt (or image query), PNG + provenance JSON each, and a grid.

    `pipe` reuses a loaded pipeline (then model, device and dtype are not used).
    """
    # 1. Check what was asked for before loading anything heavy
    check_query(prompt, image, refs, options)
    if not databases and not refs:
        raise RDMError("give --db NAME (repeatable, NAME:WEIGHT to weigh several), --db none for the query "
                       "alone, or --ref IMAGE")
    dbs = parse_databases(databases) if databases else []
    if refs and dbs:
        raise RDMError("--ref images are the neighbours themselves; leave out --db (or pass --db none)")
    if options.seed is None:
        options = replace(options, seed=secrets.randbelow(2**31 - options.num_images))
    identity = signing_identity(options)  # bad signing material is refused before any work

    # 2. Sample
    pipe = pipe or load_pipeline(resolve_model(model, [name for name, _ in dbs], indexes), device, dtype,
                                 options.progress)
    images, records = _run(pipe, prompt, dbs, options, image, refs, indexes)

    # 3. Write each image with its provenance (not the refused near-copies), then the grid
    flagged = near_copies(records)
    if options.no_copies and flagged:
        keep = [not (r.get("copy_guard") or {}).get("flagged") for r in records]
        images = [im for im, k in zip(images, keep) if k]
        records = [r for r, k in zip(records, keep) if k]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    base = slug(prompt) if prompt else slug(Path(image).stem) if image else \
        slug(Path(options.init_image).stem) if options.init_image else "refs"
    pngs, jsons = [], []
    for im, record in zip(images, records):
        stem = free_stem(folder, f"{base}-{record['seed']}")
        pngs.append(save_png(im, folder / f"{stem}.png", record, identity))
        jsons.append(write_json(folder / f"{stem}.json", record))
    grid_path = None
    if images:
        row = _input_tiles(options) + neighbour_tiles(records[0]["neighbours"]) + \
            [(im, f"seed {r['seed']}") for im, r in zip(images, records)]
        label = f"{_query_label(prompt, image, options)}\n{_describe_databases(dbs, refs)}"
        sheet = grid([row], row_labels=[label], title="rdm sample: " +
                     _query_label(prompt, image, options).replace("\n", ", "), size=GRID_TILE)
        grid_path = save_png(sheet, folder / f"{free_stem(folder, f'{base}-{options.seed}-grid', ('.png',))}.png",
                             grid_record(records), identity)
    if options.no_copies and flagged:
        raise RDMError(f"refused {len(flagged)} near-copy output(s) (--no-copies); "
                       f"{len(pngs)} other image(s) written to {folder}:\n  " + "\n  ".join(flagged))
    return SampleResult(pngs, jsons, grid_path, records, flagged)


def compare(prompt: str | None, databases: Sequence[str], model: str | None = None,
            options: SampleOptions = SampleOptions(), out: str | os.PathLike | None = None,
            indexes: str | None = None, device: str | None = None, dtype: str | None = None,
            pipe: RDMPipeline | None = None) -> tuple[Path, Path]:
    """`rdm compare`: the same prompt (or the same --init-image restyled), seeds and model with each database, one
    grid row per database."""
    check_query(prompt, None, (), options)
    if not databases:
        raise RDMError("give at least one --db to compare (--db none adds a row without retrieval)")
    rows_specs = [parse_databases([spec]) for spec in databases]  # each --db is one row
    if options.seed is None:
        options = replace(options, seed=secrets.randbelow(2**31 - options.num_images))
    name = slug(prompt) if prompt else slug(Path(options.init_image).stem)
    out = Path(out) if out else Path("outputs") / f"compare-{name}-{options.seed}.png"
    if out.suffix.lower() != ".png":
        raise RDMError(f"--out must name a .png file, got {out}")

    identity = signing_identity(options)
    every_db = [name for dbs in rows_specs for name, _ in dbs]
    pipe = pipe or load_pipeline(resolve_model(model, every_db, indexes), device, dtype, options.progress)
    neighbours, samples, labels, rows = [], [], [], []
    for spec, dbs in zip(databases, rows_specs):
        images, records = _run(pipe, prompt, dbs, options, None, (), indexes)
        neighbours.append(_input_tiles(options) + neighbour_tiles(records[0]["neighbours"]))
        samples.append([(im, f"seed {r['seed']}") for im, r in zip(images, records)])
        fingerprints = " ".join((d.get("fingerprint") or "")[:8] for d in records[0]["databases"])
        labels.append(f"{_describe_databases(dbs, ())}\n{fingerprints}\nk={len(records[0]['neighbours'])}")
        rows.append({"db": spec, "images": records})

    out.parent.mkdir(parents=True, exist_ok=True)
    width = max(len(n) for n in neighbours)  # blank tiles keep the samples of every row in the same columns
    tiles = [n + [(None, "")] * (width - len(n)) + s for n, s in zip(neighbours, samples)]
    sheet = grid(tiles, row_labels=labels, title="rdm compare: " + _query_label(prompt, None, options).replace("\n", ", "),
                 size=GRID_TILE)
    save_png(sheet, out, grid_record([rec for r in rows for rec in r["images"]]), identity)
    provenance = write_json(out.with_suffix(".json"), {
        "format": "rdm-compare", "prompt": prompt, "seeds": [options.seed + i for i in range(options.num_images)],
        "model": rows[0]["images"][0]["model"], "rows": rows})
    return out, provenance


def record_embedder(model_dir: Path, identity: dict) -> RDMConfig:
    """Rewrite rdm_config.json with the embedder's full identity (weights checksum, preprocessing)."""
    config = replace(read_rdm_config(model_dir), embedder=dict(identity))
    write_json(model_dir / "rdm_config.json", config.to_dict())
    return config


def convert(ckpt: str | os.PathLike, config: str | os.PathLike, clip: str, out: str | os.PathLike, ema: bool = True,
            k: int = 4, overwrite: bool = False, checkpoint_sha256: str | None = None,
            origin: dict | None = None) -> ConvertResult:
    """`rdm convert`: a CompVis checkpoint -> an rdm model folder that records which CLIP it expects."""
    # 1. Identify the CLIP (its weights checksum is what databases are checked against)
    identity, note = None, None
    try:
        identity = load_embedder(clip, "cpu", "float32").identity.to_dict()
    except EmbedderUnavailable as e:
        note = (f"note: CLIP {clip} could not be loaded here ({str(e).splitlines()[0]}); the model records only "
                "its id and dimension, so databases are matched by model id instead of weights checksum")
    # 2. Convert (reads the checkpoint without running anything from its pickle)
    path = convert_compvis_checkpoint(ckpt, config, out, clip=identity["model"] if identity else clip,
                                      clip_dim=identity["dim"] if identity else None, ema=ema, k=k,
                                      overwrite=overwrite, checkpoint_sha256=checkpoint_sha256, origin=origin)
    # 3. Record the full identity
    if identity is not None:
        record_embedder(path, identity)
    return ConvertResult(path=path, embedder=read_rdm_config(path).embedder, note=note)
