"""`rdm demo`: the style swap in one picture, offline, in a few minutes on a laptop CPU.

Same model, same content-only prompts ("a red star"), same seeds; only the retrieval database
changes, and with it the style:

  1. render a small toy-art set per style: the same content indices in every style, items neither
     the demo model nor the demo CLIP trained on                        (rdm.demo.toyart)
  2. build one database per style with the demo CLIP, into OUT/indexes   (rdm.demo.evaluate.build_style_databases)
  3. sample every prompt x seed with each database, then with none (the control: the query alone)
  4. one grid (rdm.images.sheets.grid): a row per database, labelled with its name and fingerprint and showing
     the nearest neighbours of the first prompt, then the control; a column per (prompt, seed)
  5. a provenance JSON beside the grid: model, CLIP, databases with their fingerprints, every image's record

The demo model and CLIP ship inside the package, in rdm/assets/demo/ (`rdm/` an rdm model folder,
`clip/` an open_clip local-dir folder), made by scripts/train_demo.sh; `model` and `clip` replace them.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..db import open_database
from ..embed import load_embedder
from ..errors import RDMError
from ..images.sheets import grid
from ..models.format import read_rdm_config, resolve_embedder_id
from ..sampling.generate import GRID_TILE, SampleOptions, _run, load_pipeline, neighbour_tiles, save_png
from ..sampling.provenance import write_json
from ..util.progress import enabled as progress_bars
from .config import DEFAULT_PROMPTS, DemoConfig  # noqa: F401 (re-exported)
from .evaluate import build_style_databases
from .toyart import ALL_STYLES, STYLES, ToyArtSpec, read_metadata  # noqa: F401

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"  # shipped with the package (package-data)
DEMO_MODEL = ASSETS / "rdm"  # rdm model folder (rdm.models.format), safetensors only
DEMO_CLIP = DEMO_MODEL / "clip"  # the model's own CLIP, open_clip's local-dir format (its rdm_config: local-dir:clip)
TRAIN_RECIPE = "bash scripts/train_demo.sh"
DEMO_START = 20_000_000  # toy-art index of the databases' first item: the demo CLIP trains on 0.., and evaluates
#                          on 10_000_000.. (rdm.demo.clip.EVAL_START); scripts/train_demo.sh trains the RDM on 0..
CONTROL = "control"  # label of the row sampled without a database


@dataclass
class DemoResult:
    """What `run_demo` wrote and how the grid is laid out."""

    grid: Path  # the comparison PNG
    provenance: Path  # its JSON, same stem
    rows: list[str]  # row labels, top to bottom: one per database (its name), then CONTROL
    columns: list[dict]  # left to right after the neighbour thumbnails: {"prompt", "seed"}
    seeds: dict[str, list[int]]  # row -> the seeds of its images, in column order (the same in every row)
    databases: dict[str, str]  # database name -> fingerprint
    seconds: dict = field(default_factory=dict)  # wall time of each stage


# --- the assets ------------------------------------------------------------------------------------

def clip_id(spec: str | Path) -> str:
    """A CLIP model id: a folder becomes 'local-dir:FOLDER'; ids (NAME:TAG, hf-hub:, local-dir:) pass through."""
    path = Path(spec).expanduser()
    return f"local-dir:{path.resolve()}" if path.is_dir() else str(spec)


def missing_assets_error(what: Sequence[Path]) -> RDMError:
    """The error of a build without the demo weights: what is missing and how to make it."""
    listed = ", ".join(str(p) for p in what)
    return RDMError(f"the demo weights are not bundled in this build (missing: {listed}). Produce them with "
                    f"`{TRAIN_RECIPE}` from a source checkout (trains the demo CLIP and RDM on toy art and copies "
                    f"them into {ASSETS}), or pass your own: rdm demo --model MODEL_DIR --clip CLIP_DIR")


def resolve_assets(model: str | None, clip: str | None) -> tuple[Path, str]:
    """(model folder, CLIP id): the arguments, else the bundled demo model and CLIP."""
    if model is None:
        missing = [p for p in (DEMO_MODEL / "rdm_config.json", DEMO_CLIP / "open_clip_config.json")
                   if not p.is_file()]
        if missing:
            raise missing_assets_error(missing)
        return DEMO_MODEL, clip_id(clip or DEMO_CLIP)
    folder = Path(model).expanduser()
    if not (folder / "rdm_config.json").is_file():
        raise RDMError(f"--model {model} is not an rdm model folder (no rdm_config.json)")
    return folder, clip_id(clip) if clip else resolve_embedder_id(read_rdm_config(folder).embedder["model"], folder)


# --- the steps -------------------------------------------------------------------------------------

def drop_stale_style_sets(root: Path, styles: Sequence[str], n: int, spec: ToyArtSpec, start: int) -> None:
    """Remove the toy-art style folders of an earlier run that drew other items, so they are drawn afresh."""
    for style in styles:
        folder = root / style
        if not (folder / "metadata.jsonl").is_file():
            continue
        rows = read_metadata(folder)
        if len(rows) != n or rows[0]["index"] != start or rows[0]["image_size"] != spec.size:
            shutil.rmtree(folder)


def sample_rows(pipe, databases: dict[str, str], config: DemoConfig, indexes: Path) -> list[dict]:
    """One pipeline call per row ({label: database name}, then none): every prompt x seed, same seeds throughout."""
    options = SampleOptions(k=config.k, num_images=config.seeds, steps=config.steps, guidance=config.guidance,
                            guidance_rescale=config.guidance_rescale, style_scale=config.style_scale,
                            scheduler=config.scheduler, eta=config.eta, adapters=tuple(config.adapters),
                            seed=config.seed, progress=progress_bars(config.progress))
    rows = []
    for label, db in [*databases.items(), (CONTROL, None)]:
        images, records = _run(pipe, list(config.prompts), [(db, 1.0)] if db else [], options, None, (),
                               str(indexes))
        rows.append({"label": label, "database": db, "images": images, "records": records})
    return rows


def comparison_grid(rows: list[dict], fingerprints: dict[str, str], thumbs: int, title: str):
    """The grid: label, up to `thumbs` neighbour tiles (blank for the control), then one tile per (prompt, seed)."""
    tiles, labels = [], []
    width = max(min(thumbs, len(row["records"][0]["neighbours"])) for row in rows)  # samples line up in columns
    for row in rows:
        first = row["records"][0]
        neighbours = neighbour_tiles(first["neighbours"], width)
        samples = [(im, f"{r['query'].get('prompt', '')}\nseed {r['seed']}")
                   for im, r in zip(row["images"], row["records"])]
        tiles.append(neighbours + [(None, "")] * (width - len(neighbours)) + samples)
        if row["database"]:
            labels.append(f"database {row['label']}\n{fingerprints[row['database']][:12]}\nk={first['k']}\n"
                          f"left: neighbours of\n'{first['query'].get('prompt', '')}'")
        else:
            labels.append(f"{CONTROL}\nno database\n(the query alone)")
    return grid(tiles, row_labels=labels, title=title, size=GRID_TILE)


def auto_threads(limit: int = 4) -> int:
    """Torch threads for the demo: the cores this process may use that are idle now (by the 1-minute load
    average), at least 1 and at most `limit`. The demo's batches are small: a second thread gains ~10% on an
    idle 2-core CPU, and threads that compete with other processes make it several times slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = cores - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return max(1, min(limit, cores, round(idle)))


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> DemoResult:
    """`rdm demo`: see the module docstring."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(config.threads or auto_threads())
        return _run_demo(config, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, log: Callable[[str], None]) -> DemoResult:
    """The five steps of the module docstring."""
    # 1. Check inputs and find the weights before anything is written
    model_dir, clip = resolve_assets(config.model, config.clip)
    out = Path(config.out).expanduser()
    seconds, t0 = {}, time.perf_counter()
    pipe = load_pipeline(model_dir, config.device, None, progress_bars(config.progress))
    if pipe.device.type == "cpu":
        pipe.unet.to(memory_format=torch.channels_last)  # oneDNN's convolutions: ~15% faster on CPU
    pipe.embedder = load_embedder(clip)  # the databases' (cached) embedder; refuses a CLIP the model did not use
    resolution = pipe.rdm_config.resolution
    seconds["load"] = time.perf_counter() - t0

    # 2. Toy art per style (same content indices in every style) and one database per style
    t0 = time.perf_counter()
    spec = ToyArtSpec(size=resolution)
    indexes = out / "indexes"
    drop_stale_style_sets(out / "toyart", config.styles, config.n_per_style, spec, DEMO_START)
    log(f"building {len(config.styles)} databases of {config.n_per_style} toy-art images ({resolution} px) "
        f"in {indexes}")
    names = build_style_databases(clip, out / "toyart", config.n_per_style, "{style}", config.styles, str(indexes),
                                  start=DEMO_START, spec=spec)
    opened = {name: open_database(name, str(indexes)) for name in names.values()}
    fingerprints = {name: db.fingerprint for name, db in opened.items()}
    seconds["databases"] = time.perf_counter() - t0

    # 3. Sample each database and the control with the same prompts, seeds and model
    t0 = time.perf_counter()
    n_images = len(config.prompts) * config.seeds
    steps = config.steps or pipe.sampling_defaults.num_inference_steps
    log(f"sampling {n_images} images ({len(config.prompts)} prompts x {config.seeds} seeds, {steps} steps) "
        f"for each of {len(names)} databases and the control")
    rows = sample_rows(pipe, names, config, indexes)
    seconds["sampling"] = time.perf_counter() - t0

    # 4. The grid
    out.mkdir(parents=True, exist_ok=True)
    title = "rdm demo: same model, prompts and seeds in every row; only the database changes"
    grid_path = save_png(comparison_grid(rows, fingerprints, config.thumbs, title), out / "demo-grid.png")

    # 5. Provenance
    seeds = {row["label"]: [r["seed"] for r in row["records"]] for row in rows}
    columns = [{"prompt": r["query"].get("prompt"), "seed": r["seed"]} for r in rows[0]["records"]]
    databases = [{"name": name, "style": style, "fingerprint": fingerprints[name],
                  "count": opened[name].count, "path": str(opened[name].path)} for style, name in names.items()]
    provenance = write_json(grid_path.with_suffix(".json"), {
        "format": "rdm-demo", "grid": str(grid_path), "model": rows[0]["records"][0]["model"], "clip": clip,
        "config": {**asdict(replace(config, model=str(model_dir), clip=clip)), "prompts": list(config.prompts),
                   "styles": list(config.styles)},
        "toyart": {**asdict(spec), "start": DEMO_START, "n_per_style": config.n_per_style},
        "databases": databases, "columns": columns,
        "rows": [{"label": row["label"], "database": row["database"],
                  "fingerprint": fingerprints.get(row["database"]), "seeds": seeds[row["label"]],
                  "images": row["records"]} for row in rows]})
    log(f"grid: {grid_path}\nprovenance: {provenance}")
    return DemoResult(grid=grid_path, provenance=provenance, rows=[row["label"] for row in rows], columns=columns,
                      seeds=seeds, databases=fingerprints, seconds=seconds)
