"""The style-swap proof: same weights, same prompts, same seeds; only the retrieval database changes.

For each per-style database, content-only prompts ("a red star") are sampled with a fixed list of
seeds, and the toy-art classifier (rdm.demo.classifier) judges every sample:

* style-swap accuracy: share of samples in the database's style (goal >= 90%);
* content accuracy: share with the prompted shape and colour (goal >= 80%);
* the control: the same prompts and seeds with no database (the query alone), and the style mix it gives;
* a confusion matrix, database style x predicted style;
* with a `centroids` judge (rdm.demo.blind.CentroidJudge): the nearest-centroid style in the demo
  CLIP's image space, which learned nothing about samples (goal >= 90%); with `reference_borders`
  ({style: the database's own border colour}), each sample's border colour error (goal <= 0.05);
* with a `scorer` (`database_scorer`: rdm score, rdm/sampling/score.py), measures that need no judge: retrieval
  precision and linear-probe accuracy towards the database sampled from (over all the style
  databases), and CLIP similarity with each sample's prompt.

The sampler is a parameter, `sampler(prompts, database, seeds) -> images` (database None is the
control), so the bookkeeping is testable without a trained model; `pipeline_sampler` adapts an
`rdm.sampling.pipeline.RDMPipeline`. The judge is anything with `predict(images) -> [{style, shape, colour}]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from PIL import Image

from ..build import build_index
from ..db.database import Database
from ..errors import RDMError
from ..images.sheets import grid
from ..sampling.score import SAMPLER_GRID
from .blind import border_rgb
from .toyart import COLOURS, SHAPES, STYLES, ToyArtSpec, generate, make_caption

CONTROL = "control (no database)"  # the row of samples drawn from the query alone
STYLE_SWAP_GOAL = 0.90
CONTENT_GOAL = 0.80
CENTROID_GOAL = 0.90  # nearest-centroid style-swap accuracy
BORDER_GOAL = 0.05  # mean absolute RGB difference between a sample's border and its database's

Sampler = Callable[[list[str], Any, list[int]], list[Image.Image]]  # (prompts, database or None, seeds) -> images
Scorer = Callable[[list[Image.Image], Any, list[str]], dict]  # (images, style or None, prompts) -> rdm score summary


class Judge(Protocol):
    """What labels samples: rdm.demo.classifier.ToyArtClassifier, or a stand-in in tests."""

    def predict(self, images: Sequence[Image.Image]) -> list[dict]: ...


@dataclass(frozen=True)
class StyleSwapConfig:
    """Which samples the proof draws: every content pair x every seed, for each database and the control."""

    contents: tuple[tuple[str, str], ...] = ()  # (shape, colour) pairs; empty: content_grid(16)
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # sample seeds; (content c, seed s) is drawn with seed s * 10_000 + c
    batch_size: int = 32  # prompts per sampler call
    control: bool = True  # also sample the query alone (database None)

    def __post_init__(self):
        object.__setattr__(self, "contents", tuple(tuple(c) for c in self.contents) or content_grid(16))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        for shape, colour in self.contents:
            if shape not in SHAPES or colour not in COLOURS:
                raise RDMError(f"unknown content ({shape}, {colour}); shapes: {', '.join(SHAPES)}; "
                               f"colours: {', '.join(COLOURS)}")
        if not self.seeds:
            raise RDMError("the style-swap evaluation needs at least one seed")


def content_grid(n: int) -> tuple[tuple[str, str], ...]:
    """n (shape, colour) pairs: every shape and colour equally often, pairings varied (all 64 at n = 64)."""
    if not 1 <= n <= len(SHAPES) * len(COLOURS):
        raise RDMError(f"content_grid takes 1 to {len(SHAPES) * len(COLOURS)} pairs, got {n}")
    colours = tuple(COLOURS)
    return tuple((SHAPES[i % 8], colours[(i % 8 + 3 * (i // 8)) % 8]) for i in range(n))


def sample_seed(content: int, seed: int) -> int:
    """The seed of content pair `content` under evaluation seed `seed`: the same for every database."""
    return seed * 10_000 + content


# ---------------------------------------------------------------- running


def draw_samples(sampler: Sampler, database: Any, config: StyleSwapConfig) -> list[dict]:
    """One record per (content, seed): prompt, shape, colour, seed and the sampled image."""
    jobs = [{"content": c, "shape": shape, "colour": colour, "prompt": make_caption(shape, colour),
             "eval_seed": s, "seed": sample_seed(c, s)}
            for s in config.seeds for c, (shape, colour) in enumerate(config.contents)]
    for i in range(0, len(jobs), config.batch_size):
        batch = jobs[i:i + config.batch_size]
        images = sampler([j["prompt"] for j in batch], database, [j["seed"] for j in batch])
        if len(images) != len(batch):
            raise RDMError(f"the sampler returned {len(images)} images for {len(batch)} prompts")
        for job, image in zip(batch, images):
            job["image"] = image
    return jobs


def judge_samples(judge: Judge, samples: list[dict], batch_size: int = 256) -> None:
    """Add the judge's predicted style, shape and colour (and their probabilities) to each sample record."""
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        for sample, pred in zip(chunk, judge.predict([s["image"] for s in chunk])):
            sample.update({f"pred_{k}": v for k, v in pred.items()})


def summarise(samples: list[dict], style: str | None, reference_borders: Mapping | None = None) -> dict:
    """Accuracies and the predicted-style counts of one database's samples (style None: the control)."""
    n = len(samples)
    shape_ok = [s["pred_shape"] == s["shape"] for s in samples]
    colour_ok = [s["pred_colour"] == s["colour"] for s in samples]
    counts = {st: sum(s["pred_style"] == st for s in samples) for st in STYLES}
    out = {"n": n, "shape_accuracy": sum(shape_ok) / n, "colour_accuracy": sum(colour_ok) / n,
           "content_accuracy": sum(a and b for a, b in zip(shape_ok, colour_ok)) / n,
           "predicted_styles": counts, "style_shares": {st: c / n for st, c in counts.items()}}
    if style is not None:
        out["style_swap_accuracy"] = counts.get(style, 0) / n
    if "centroid_style" in samples[0]:
        out["centroid_shares"] = {st: sum(s["centroid_style"] == st for s in samples) / n for st in STYLES}
        if style is not None:
            out["centroid_accuracy"] = out["centroid_shares"].get(style, 0.0)
    if "border_rgb" in samples[0]:
        out["border_rgb"] = [sum(s["border_rgb"][c] for s in samples) / n for c in range(3)]
        if reference_borders is not None and style in reference_borders:
            ref = [float(v) for v in reference_borders[style]]
            out["reference_border_rgb"] = ref
            out["border_error"] = sum(sum(abs(s["border_rgb"][c] - ref[c]) for c in range(3)) / 3
                                      for s in samples) / n
    return out


def run_style_swap(sampler: Sampler, databases: Mapping[str, Any], judge: Judge,
                   config: StyleSwapConfig = StyleSwapConfig(), keep_images: bool = False,
                   log: Callable[[str], None] | None = None, scorer: Scorer | None = None,
                   centroids: Any = None, reference_borders: Mapping | None = None) -> dict:
    """The style-swap proof: sample every database (keyed by the style it holds) and the control; judge; tabulate.

    centroids: a judge with predict(images) -> [style] (rdm.demo.blind.CentroidJudge); reference_borders:
    {style: (3,) border colour of that database's images} (rdm.demo.blind.style_borders)."""
    # 1. Check inputs
    unknown = [style for style in databases if style not in STYLES]
    if unknown or not databases:
        raise RDMError(f"databases must be keyed by the style they hold ({', '.join(STYLES)}); got "
                       f"{', '.join(map(str, databases)) or 'none'}")

    # 2. Sample each database, then the control, with the same prompts and seeds
    rows: dict[str, list[dict]] = {}
    for style, database in databases.items():
        rows[style] = draw_samples(sampler, database, config)
        if log:
            log(f"sampled {len(rows[style])} images with the {style} database")
    if config.control:
        rows[CONTROL] = draw_samples(sampler, None, config)
        if log:
            log(f"sampled {len(rows[CONTROL])} images with no database")

    # 3. Judge every sample (and score each database's samples with rdm score)
    for samples in rows.values():
        judge_samples(judge, samples)
        if centroids is not None:
            for sample, style in zip(samples, centroids.predict([j["image"] for j in samples])):
                sample["centroid_style"] = style
        if reference_borders is not None:
            for sample in samples:
                sample["border_rgb"] = [float(v) for v in border_rgb(sample["image"])]

    # 4. Tabulate
    per_database = {name: summarise(samples, None if name == CONTROL else name, reference_borders)
                    for name, samples in rows.items()}
    if scorer is not None:
        for name, samples in rows.items():
            per_database[name]["score"] = scorer([j["image"] for j in samples], None if name == CONTROL else name,
                                                 [j["prompt"] for j in samples])
    styles = [s for s in databases]
    swap = [per_database[s]["style_swap_accuracy"] for s in styles]
    content = [per_database[s]["content_accuracy"] for s in styles]
    pairs = {(j["content"], j["eval_seed"]) for j in rows[styles[0]]}
    all_swapped = sum(all(next(j for j in rows[s] if (j["content"], j["eval_seed"]) == p)["pred_style"] == s
                          for s in styles) for p in pairs) / len(pairs)
    report = {
        "config": {**asdict(config), "contents": [list(c) for c in config.contents]},
        "styles": styles,
        "summary": {
            "style_swap_accuracy": sum(swap) / len(swap),  # mean over databases
            "style_swap_accuracy_min": min(swap),
            "content_accuracy": sum(content) / len(content),
            "shape_accuracy": sum(per_database[s]["shape_accuracy"] for s in styles) / len(styles),
            "colour_accuracy": sum(per_database[s]["colour_accuracy"] for s in styles) / len(styles),
            "all_styles_swapped": all_swapped,  # share of (prompt, seed) whose samples took every database's style
            "style_swap_goal": STYLE_SWAP_GOAL, "content_goal": CONTENT_GOAL,
            "style_swap_passed": sum(swap) / len(swap) >= STYLE_SWAP_GOAL,
            "content_passed": sum(content) / len(content) >= CONTENT_GOAL,
        },
        "per_database": per_database,
        "confusion": {"rows": list(rows), "columns": list(STYLES),
                      "counts": [[per_database[r]["predicted_styles"][c] for c in STYLES] for r in rows]},
        "samples": [{k: v for k, v in j.items() if k != "image"} | {"database": name}
                    for name, samples in rows.items() for j in samples],
    }
    if centroids is not None:
        acc = [per_database[s]["centroid_accuracy"] for s in styles]
        report["summary"].update(centroid_accuracy=sum(acc) / len(acc), centroid_accuracy_min=min(acc),
                                 centroid_goal=CENTROID_GOAL, centroid_passed=sum(acc) / len(acc) >= CENTROID_GOAL)
    if reference_borders is not None:
        errors = [per_database[s]["border_error"] for s in styles if "border_error" in per_database[s]]
        if errors:
            report["summary"].update(border_error=sum(errors) / len(errors), border_error_max=max(errors),
                                     border_goal=BORDER_GOAL, border_passed=sum(errors) / len(errors) <= BORDER_GOAL)
    if scorer is not None:
        scores = [per_database[s]["score"] for s in styles]
        report["summary"]["score"] = {key: sum(sc[key] for sc in scores) / len(scores)
                                      for key in ("retrieval_precision", "probe_accuracy", "content")}
    if CONTROL in per_database:
        report["summary"]["control_style_shares"] = per_database[CONTROL]["style_shares"]
        report["summary"]["control_content_accuracy"] = per_database[CONTROL]["content_accuracy"]
    report["markdown"] = markdown(report)
    if keep_images:
        report["images"] = {name: [j["image"] for j in samples] for name, samples in rows.items()}
    return report


# ---------------------------------------------------------------- reporting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """The figures of a style-swap report as markdown: a per-database table, then the confusion matrix."""
    s = report["summary"]
    lines = ["| database | samples | style-swap acc. | shape acc. | colour acc. | content acc. | predicted styles |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, row in report["per_database"].items():
        mix = ", ".join(f"{st} {_pct(v)}" for st, v in sorted(row["style_shares"].items(), key=lambda kv: -kv[1]) if v)
        swap = _pct(row["style_swap_accuracy"]) if "style_swap_accuracy" in row else "-"
        lines.append(f"| {name} | {row['n']} | {swap} | {_pct(row['shape_accuracy'])} | "
                     f"{_pct(row['colour_accuracy'])} | {_pct(row['content_accuracy'])} | {mix} |")
    lines.append(f"| **mean over databases** | | **{_pct(s['style_swap_accuracy'])}** | {_pct(s['shape_accuracy'])} "
                 f"| {_pct(s['colour_accuracy'])} | **{_pct(s['content_accuracy'])}** | |")
    lines += ["", f"Style-swap accuracy {_pct(s['style_swap_accuracy'])} (goal {_pct(s['style_swap_goal'])}: "
              f"{'passed' if s['style_swap_passed'] else 'not reached'}), content accuracy "
              f"{_pct(s['content_accuracy'])} (goal {_pct(s['content_goal'])}: "
              f"{'passed' if s['content_passed'] else 'not reached'}); every database's style on the same prompt "
              f"and seed: {_pct(s['all_styles_swapped'])}.", "",
              "Confusion matrix (rows: database, columns: predicted style):", "",
              "| database | " + " | ".join(report["confusion"]["columns"]) + " |",
              "|---|" + "---:|" * len(report["confusion"]["columns"])]
    for name, counts in zip(report["confusion"]["rows"], report["confusion"]["counts"]):
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    if "centroid_accuracy" in s or "border_error" in s:
        lines += ["", "Blind judges (nothing learned from samples): nearest style centroid in the demo CLIP's image "
                  "space; border colour (mean RGB of the outer frame) against the database's own images:", "",
                  "| database | nearest-centroid style acc. | border RGB | database border RGB | border error |",
                  "|---|---:|---|---|---:|"]
        for name, row in report["per_database"].items():
            acc = _pct(row["centroid_accuracy"]) if "centroid_accuracy" in row else "-"
            rgb = lambda v: " ".join(f"{c:.2f}" for c in v) if v else "-"  # noqa: E731
            err = f"{row['border_error']:.3f}" if "border_error" in row else "-"
            lines.append(f"| {name} | {acc} | {rgb(row.get('border_rgb'))} | {rgb(row.get('reference_border_rgb'))} "
                         f"| {err} |")
        acc = f"**{_pct(s['centroid_accuracy'])}**" if "centroid_accuracy" in s else "-"
        err = f"**{s['border_error']:.3f}**" if "border_error" in s else "-"
        lines.append(f"| **mean over databases** | {acc} | | | {err} |")
        goals = []
        if "centroid_accuracy" in s:
            goals.append(f"nearest-centroid {_pct(s['centroid_accuracy'])} (goal {_pct(s['centroid_goal'])}: "
                         f"{'passed' if s['centroid_passed'] else 'not reached'})")
        if "border_error" in s:
            goals.append(f"border error {s['border_error']:.3f} (goal <= {s['border_goal']}: "
                         f"{'passed' if s['border_passed'] else 'not reached'})")
        lines += ["", "; ".join(goals) + "."]
    if "score" in s:
        lines += ["", "rdm score (no judge; over all the style databases, towards the one sampled from):", "",
                  "| database | retrieval precision | probe accuracy | CLIP content similarity |",
                  "|---|---:|---:|---:|"]
        for name, row in report["per_database"].items():
            sc = row["score"]
            precision = _pct(sc["retrieval_precision"]) if "retrieval_precision" in sc else "-"
            probe = _pct(sc["probe_accuracy"]) if "probe_accuracy" in sc else "-"
            lines.append(f"| {name} | {precision} | {probe} | {sc['content']:.3f} |")
        mean = s["score"]
        lines.append(f"| **mean over databases** | **{_pct(mean['retrieval_precision'])}** | "
                     f"**{_pct(mean['probe_accuracy'])}** | {mean['content']:.3f} |")
    return "\n".join(lines)


def contact_sheet(report: dict, out: str | Path, columns: int = 16, size: int = 96) -> Path:
    """A grid of the first `columns` samples per database (same prompt and seed down each column); needs keep_images."""
    if "images" not in report:
        raise RDMError("the report holds no images: run run_style_swap(..., keep_images=True)")
    rows, labels = [], []
    for name, images in report["images"].items():
        records = [r for r in report["samples"] if r["database"] == name][:columns]
        rows.append([(im, f"{r['pred_style']} {r['pred_colour']}\n{r['pred_shape']}")
                     for im, r in zip(images[:columns], records)])
        labels.append(name)
    prompts = [r["prompt"] for r in report["samples"][:columns]]
    sheet = grid(rows, row_labels=labels, size=size,
                 title="same prompts and seeds down each column: " + "; ".join(prompts[:4]) + " ...")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


# ---------------------------------------------------------------- the real sampler and databases


def pipeline_sampler(pipe, k: int | None = None, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, scheduler: str | None = None, indexes: str | None = None,
                     eta: float | None = None, style_scale: float | None = None,
                     guidance_rescale: float | None = None, control=None) -> Sampler:
    """A Sampler drawing from an rdm.sampling.pipeline.RDMPipeline: one image per prompt, seeded per image; settings left at
    None are the model's own."""
    pipe.set_progress_bar_config(disable=True)

    def sample(prompts: list[str], database: Any, seeds: list[int]) -> list[Image.Image]:
        out = pipe(prompt=list(prompts), databases=database, k=k, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, style_scale=style_scale, scheduler=scheduler, eta=eta,
                   guidance_rescale=guidance_rescale, seed=list(seeds), indexes=indexes, control=control,
                   output_type="pil")
        return out.images

    return sample


def database_scorer(databases: Mapping[str, Any], k: int = 10, embedder=None, seed: int = 0) -> Scorer:
    """A Scorer by rdm score over {style: Database}: towards the style's database, one linear probe for all rows."""
    from ..sampling.score import ScoreOptions, score_images, train_probe

    dbs = list(databases.values())
    probe = train_probe(dbs, ScoreOptions(seed=seed))

    def score(images: list[Image.Image], style: Any, prompts: list[str]) -> dict:
        target = databases[style].name if style is not None else None
        report = score_images(images, dbs, ScoreOptions(k=k, target=target, seed=seed), embedder=embedder,
                              prompts=prompts, probe=probe)
        return {**report.summary, "k": report.k, "probe_heldout_accuracy": probe.heldout_accuracy}

    return score


def database_borders(databases: Mapping[str, Any], n: int = 256) -> dict:
    """{style: (3,) mean border colour of the first n images of that style's database} (their `path` column)."""
    from .blind import style_borders

    images = {}
    for style, db in databases.items():
        if "path" not in db.metadata.column_names:
            raise RDMError(f"database {db.name} lists no image paths, so its border colour is unknown")
        paths = [p for p in db.metadata.column("path").to_pylist()[:n] if p]
        try:
            images[style] = [Image.open(p).convert("RGB") for p in paths]
        except OSError as e:
            raise RDMError(f"database {db.name}: cannot read its image {e.filename or ''} ({e})") from None
        if not images[style]:
            raise RDMError(f"database {db.name} lists no image paths, so its border colour is unknown")
    return style_borders(images)


def open_style_databases(template: str, styles: Sequence[str] = STYLES, indexes: str | None = None) -> dict:
    """{style: Database} for database names made from `template` (e.g. 'toyart-{style}')."""
    if "{style}" not in template:
        raise RDMError(f"the database name template must contain {{style}}, e.g. toyart-{{style}}; got {template!r}")
    return {style: Database.open(template.format(style=style), indexes) for style in styles}


def build_style_databases(clip: str, root: str | Path, n_per_style: int, template: str = "toyart-{style}",
                          styles: Sequence[str] = STYLES, indexes: str | None = None, start: int = 0,
                          spec: ToyArtSpec = ToyArtSpec(), overwrite: bool = False) -> dict:
    """Render n toy-art items per style into root/<style>/ and build one database per style; {style: name}."""
    names = {}
    for style in styles:
        folder = Path(root) / style
        if not (folder / "metadata.jsonl").is_file() or overwrite:
            generate(spec, n_per_style, folder, styles=[style], start=start, overwrite=overwrite)
        names[style] = template.format(style=style)
        build_index(str(folder), name=names[style], clip=clip, indexes=indexes, workers=0, progress=False,
                        overwrite=True)
    return names


# ---------------------------------------------------------------- the style swap over the samplers

def grid_sampler(pipe, cell: Mapping, indexes: str | None = None, k: int | None = None) -> Sampler:
    """A pipeline Sampler with one grid cell's settings (absent ones: the model's own)."""
    return pipeline_sampler(pipe, k=k, num_inference_steps=cell.get("steps"), guidance_scale=cell.get("guidance"),
                            scheduler=cell.get("scheduler"), indexes=indexes, eta=cell.get("eta"),
                            style_scale=cell.get("style_scale"), guidance_rescale=cell.get("guidance_rescale"))


def run_sampler_grid(sampler_for: Callable[[Mapping], Sampler], databases: Mapping[str, Any], centroids: Any,
                     reference_borders: Mapping, config: StyleSwapConfig, cells: Sequence[Mapping] = SAMPLER_GRID,
                     log: Callable[[str], None] | None = None) -> list[dict]:
    """The blind style swap (nearest centroid, border colour) at every cell: one row per cell with its accuracy,
    border error, the weakest database and the verdict against CENTROID_GOAL and BORDER_GOAL."""
    rows = []
    for cell in cells:
        sampler, per_db = sampler_for(cell), {}
        for style, db in databases.items():
            samples = draw_samples(sampler, db, config)
            predicted = centroids.predict([s["image"] for s in samples])
            for s, p in zip(samples, predicted):
                s["centroid_style"], s["border_rgb"] = p, [float(v) for v in border_rgb(s.pop("image"))]
            per_db[style] = summarise_blind(samples, style, reference_borders)
        n = sum(d["n"] for d in per_db.values())
        accuracy = sum(d["centroid_accuracy"] * d["n"] for d in per_db.values()) / n
        border = sum(d["border_error"] * d["n"] for d in per_db.values()) / n
        weakest = min(per_db, key=lambda st: per_db[st]["centroid_accuracy"])
        row = {**dict(cell), "n": n, "centroid_accuracy": accuracy, "border_error": border, "weakest": weakest,
               "weakest_accuracy": per_db[weakest]["centroid_accuracy"],
               "holds": accuracy >= CENTROID_GOAL and border <= BORDER_GOAL, "databases": per_db}
        rows.append(row)
        if log:
            log(f"{cell['label']:<34} style-swap {_pct(accuracy):>6}  border {border:.3f}  weakest {weakest} "
                f"{_pct(row['weakest_accuracy'])}  {'holds' if row['holds'] else 'FAILS'}")
    return rows


def summarise_blind(samples: list[dict], style: str, reference_borders: Mapping) -> dict:
    """Nearest-centroid accuracy and border error of one database's samples (no classifier needed)."""
    n = len(samples)
    ref = [float(v) for v in reference_borders[style]]
    return {"n": n, "centroid_accuracy": sum(s["centroid_style"] == style for s in samples) / n,
            "border_error": sum(sum(abs(s["border_rgb"][c] - ref[c]) for c in range(3)) / 3 for s in samples) / n}


def grid_markdown(rows: list[dict], title: str) -> str:
    """The grid as a markdown table, one line per cell."""
    lines = [f"**{title}**", "", "| sampler | style-swap (nearest centroid) | border error | weakest database | holds |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_pct(r['centroid_accuracy'])} | {r['border_error']:.3f} | "
                     f"{r['weakest']} {_pct(r['weakest_accuracy'])} | {'yes' if r['holds'] else '**no**'} |")
    return "\n".join(lines)
