"""`rdm score`: how closely images follow the style of each of several databases, and their prompt.

Any images against any databases (all built with one CLIP), with no judge trained for the task:

(a) retrieval precision: each image's k nearest neighbours over the union of the databases (its CLIP
    image embedding against their stored vectors, merged by similarity); the share from each database,
    and the target's share is the precision. A style-swap that works puts the neighbours of a sample
    drawn with database A in A.
(b) a linear probe: multinomial logistic regression on the databases' stored vectors, labelled by
    database (class-balanced, seeded split, full-batch L-BFGS; seconds), gives each image a probability
    per database. Its held-out accuracy on stored vectors says how separable the databases are at all.
(c) content: cosine similarity between each image's CLIP embedding and the prompt's text embedding
    (CLIPScore without the rescaling, Hessel et al. 2021), when a prompt is given.

    report = score_images(images, [Database.open("flat"), Database.open("neon")], ScoreOptions(target="flat"))
    print(report.table()); report.to_dict()
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import RDMError
from ..images.decode import IMAGE_EXTENSIONS
from .options import ScoreOptions  # noqa: F401 (defined with the other commands' options)

FORMAT = "rdm-score"


@dataclass
class ImageScore:
    """The three measures for one image."""

    image: str  # its path or label
    retrieval: dict[str, float]  # database -> share of the image's k nearest neighbours from it
    probe: dict[str, float]  # database -> the probe's probability
    probe_pick: str  # the database the probe finds most likely
    content: float | None  # cosine similarity with the prompt (None without a prompt)


@dataclass
class ScoreReport:
    """Per-image scores, their means, and the probe's own held-out accuracy."""

    databases: list[str]  # names, in the order given
    target: str | None
    prompt: str | None
    k: int  # neighbours actually counted per image (k, or fewer if the databases hold fewer items)
    images: list[ImageScore]
    probe: dict  # heldout_accuracy, train_vectors, heldout_vectors, per_database (vectors used)
    summary: dict = field(default_factory=dict)  # means; with a target: retrieval_precision, probe_accuracy ...

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def table(self) -> str:
        """A plain-text table: one row per image, then the mean, then the summary."""
        names, content = self.databases, self.summary.get("content") is not None
        head = (["image"] + [f"nn:{n}" for n in names] + [f"probe:{n}" for n in names] + ["probe pick"]
                + (["content"] if content else []))
        rows = [[Path(s.image).name or s.image] + [f"{s.retrieval[n]:.2f}" for n in names]
                + [f"{s.probe[n]:.2f}" for n in names] + [s.probe_pick]
                + ([f"{s.content:.3f}"] if content else []) for s in self.images]
        mean = self.summary
        rows.append(["mean"] + [f"{mean['retrieval'][n]:.2f}" for n in names]
                    + [f"{mean['probe'][n]:.2f}" for n in names] + [""]
                    + ([f"{mean['content']:.3f}"] if content else []))
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        def fmt(row: list[str]) -> str:  # the image column left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = fmt(["-" * w for w in widths])
        lines = [fmt(head), rule] + [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1]), ""]
        heldout = self.probe["heldout_accuracy"]
        lines.append(f"{len(self.images)} images; {self.k} nearest neighbours each over {', '.join(names)}; probe "
                     f"held-out accuracy on the stored vectors " + ("-" if heldout is None else f"{heldout:.3f}"))
        if self.target:
            lines.append(f"target {self.target}: retrieval precision {mean['retrieval_precision']:.3f}, probe picks "
                         f"it for {mean['probe_accuracy']:.3f} of the images (mean probability "
                         f"{mean['probe_target_probability']:.3f})")
        if content:
            with_what = f"'{self.prompt}'" if self.prompt else "each image's prompt"
            lines.append(f"content: mean CLIP similarity with {with_what} {mean['content']:.3f}")
        return "\n".join(lines)


# --- inputs ------------------------------------------------------------------------------------------

def expand_images(specs: Sequence[str | Path]) -> list[Path]:
    """Image files, and the images inside folders (sorted), in the order given."""
    out = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            out.append(path)
        else:
            raise RDMError(f"no such image or folder: {spec}")
    if not out:
        raise RDMError(f"no images found in {', '.join(map(str, specs)) or '(nothing given)'}")
    return out


def check_databases(databases: Sequence[Any], target: str | None) -> list[str]:
    """The databases' names; refuse none, duplicates, different CLIPs, or a target that is not among them."""
    if not databases:
        raise RDMError("give at least one database to score against (--db NAME, repeatable)")
    names = [db.name for db in databases]
    if len(set(names)) != len(names):
        raise RDMError(f"each database once, please: got {', '.join(names)}")
    first = databases[0]
    for db in databases[1:]:
        if not db.identity.same_vectors_as(first.identity):
            raise RDMError(f"databases {first.name} and {db.name} were built with different CLIPs "
                           f"({first.identity.describe()} vs {db.identity.describe()}); score against databases of "
                           "one CLIP")
    if target is not None and target not in names:
        raise RDMError(f"--target {target} is not one of the databases scored against: {', '.join(names)}")
    return names


# --- (a) retrieval precision -------------------------------------------------------------------------

def retrieval_shares(queries: np.ndarray, databases: Sequence[Any], k: int) -> tuple[np.ndarray, int]:
    """((Q, n_databases) share of each query's k nearest neighbours over the union from each database, k used)."""
    scores, owner = [], []
    for i, db in enumerate(databases):
        result = db.search(queries, k=min(k, db.count))
        scores.append(np.where(result.rows >= 0, result.scores, -np.inf))  # (Q, k_i)
        owner.append(np.full(result.rows.shape[1], i))
    scores, owner = np.concatenate(scores, 1), np.concatenate(owner)  # (Q, sum k_i), (sum k_i,)
    k_used = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_used]  # ties: the database listed first
    valid = np.take_along_axis(scores, top, 1) > -np.inf
    counts = np.stack([((owner[top] == i) & valid).sum(1) for i in range(len(databases))], 1)  # (Q, n)
    return counts / np.maximum(valid.sum(1, keepdims=True), 1), k_used


# --- (b) the linear probe ----------------------------------------------------------------------------

@dataclass
class LinearProbe:
    """Multinomial logistic regression from CLIP vectors to databases."""

    weight: torch.Tensor  # (D, n_databases)
    bias: torch.Tensor  # (n_databases,)
    heldout_accuracy: float | None  # on stored vectors it did not train on (None: too few to hold any out)
    counts: dict  # train_vectors, heldout_vectors, per_database

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(Q, n_databases) probabilities for (Q, D) vectors."""
        with torch.no_grad():
            return torch.softmax(torch.from_numpy(np.asarray(x, np.float32)) @ self.weight + self.bias, 1).numpy()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 200) -> tuple:
    """Class-balanced multinomial logistic regression by full-batch L-BFGS from zeros (deterministic)."""
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    balance = len(y) / (classes * torch.bincount(y, minlength=classes).clamp(min=1).float())
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y, weight=balance) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def train_probe(databases: Sequence[Any], options: ScoreOptions = ScoreOptions()) -> LinearProbe:
    """A probe on up to `probe_max_per_database` stored vectors of each database, `probe_holdout` held out."""
    rng = np.random.default_rng(options.seed)
    train_x, train_y, test_x, test_y, used = [], [], [], [], {}
    for label, db in enumerate(databases):
        vectors = np.asarray(db.vectors, np.float32)
        pick = rng.permutation(len(vectors))[:options.probe_max_per_database]
        held = int(round(len(pick) * options.probe_holdout)) if len(pick) > 1 else 0
        test_x.append(vectors[pick[:held]])
        train_x.append(vectors[pick[held:]])
        test_y += [label] * held
        train_y += [label] * (len(pick) - held)
        used[db.name] = len(pick)
    x, y = torch.from_numpy(np.concatenate(train_x)), torch.tensor(train_y)
    with torch.random.fork_rng():  # L-BFGS draws nothing, but keep the caller's RNG untouched all the same
        weight, bias = fit_logistic(x, y, len(databases), options.probe_l2)
    probe = LinearProbe(weight, bias, None, {"train_vectors": len(train_y), "heldout_vectors": len(test_y),
                                                     "per_database": used})
    if test_y:
        probe.heldout_accuracy = float((probe.predict_proba(np.concatenate(test_x)).argmax(1) == test_y).mean())
    return probe


# --- the score ---------------------------------------------------------------------------------------

def score_images(images: Sequence[Image.Image | str | Path], databases: Sequence[Any],
                 options: ScoreOptions = ScoreOptions(), embedder=None, prompts: Sequence[str] | None = None,
                 probe: LinearProbe | None = None) -> ScoreReport:
    """Score images against databases: see the module docstring. `embedder` defaults to the databases' CLIP;
    `prompts` gives each image its own prompt instead of options.prompt; `probe` reuses one train_probe made."""
    # 1. Check inputs
    names = check_databases(databases, options.target)
    if options.k < 1:
        raise RDMError(f"k must be at least 1, got {options.k}")
    if not images:
        raise RDMError("no images to score")
    prompts = list(prompts) if prompts is not None else [options.prompt] * len(images) if options.prompt is not None \
        else None
    if prompts is not None and (len(prompts) != len(images) or any(not p or not p.strip() for p in prompts)):
        raise RDMError("empty --prompt (or not one prompt per image): give the content the images should show, or "
                       "leave it out")

    # 2. Embed the images (and the prompt) with the databases' CLIP
    if embedder is None:
        from ..embed import embedder_for

        embedder = embedder_for(databases[0], options.device)
    vectors, labels = embedder.encode_image_inputs(list(images))  # (Q, D), files decoded as database builds do

    # 3. The three measures
    shares, k_used = retrieval_shares(vectors, databases, options.k)  # (Q, n)
    probe = probe or train_probe(databases, options)
    probabilities = probe.predict_proba(vectors)  # (Q, n)
    content = [None] * len(labels)
    if prompts is not None:
        unique = sorted(set(prompts))
        text = dict(zip(unique, embedder.encode_text(unique)))  # prompt -> (D,) unit vector
        content = [float(v @ text[p]) for v, p in zip(vectors, prompts)]

    # 4. Per image, then the means
    rows = [ImageScore(image=label, retrieval=dict(zip(names, map(float, s))), probe=dict(zip(names, map(float, p))),
                       probe_pick=names[int(p.argmax())], content=None if c is None else float(c))
            for label, s, p, c in zip(labels, shares, probabilities, content)]
    summary = {"images": len(rows), "retrieval": dict(zip(names, map(float, shares.mean(0)))),
               "probe": dict(zip(names, map(float, probabilities.mean(0)))),
               "content": float(np.mean(content)) if prompts is not None else None}
    if options.target:
        t = names.index(options.target)
        summary.update(retrieval_precision=float(shares[:, t].mean()),
                       probe_accuracy=float((probabilities.argmax(1) == t).mean()),
                       probe_target_probability=float(probabilities[:, t].mean()))
    prompt = options.prompt if prompts is None or len(set(prompts)) > 1 else prompts[0]
    return ScoreReport(databases=names, target=options.target, prompt=prompt if prompts else None, k=k_used,
                       images=rows,
                       probe={"heldout_accuracy": probe.heldout_accuracy, **probe.counts}, summary=summary)


def score(images: Sequence[str | Path], databases: Sequence[str], options: ScoreOptions = ScoreOptions(),
          indexes: str | None = None) -> ScoreReport:
    """`rdm score`: image files or folders against databases by name or folder."""
    from ..db.database import Database

    opened = [Database.open(name, indexes) for name in databases]
    if options.target in databases:  # --target as given to --db (a folder, say): the database's own name
        options = replace(options, target=opened[list(databases).index(options.target)].name)
    return score_images(expand_images(images), opened, options)


# --- the style swap of a model: sample with each database, score towards it -----------------------------

# The sampler settings every claim about a model's style swap is checked on: whatever the model records as its own
# (every setting None), DDIM and DPM-Solver++ at few and many steps, at two guidance scales.
SAMPLER_GRID = (
    {"label": "model's defaults"},
    *({"label": f"{name} {steps} steps, guidance {g:g}", "scheduler": name, "steps": steps, "guidance": g}
      for g in (3.0, 5.0) for name, counts in (("ddim", (8, 25, 50)), ("dpm++", (10, 20, 50))) for steps in counts),
)


@dataclass(frozen=True)
class SwapSettings:
    """One cell of a style-swap run: the sampler settings (None: the model's own) and its label."""

    label: str = "model's defaults"
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    style_scale: float | None = None
    eta: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SwapSettings":
        return cls(**d)


def style_swap(pipe, databases: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int],
               cells: Sequence[SwapSettings] = (SwapSettings(),), options: ScoreOptions = ScoreOptions(),
               log=None, control=None, k: int | None = None) -> list[dict]:
    """The model's style swap judged by rdm score, with no judge trained on samples: for each cell, every prompt x
    seed is sampled with each database as the only source of neighbours (the same seeds throughout, so only the
    database changes) and scored towards that database. One row per cell: the probe's accuracy towards the
    database sampled from (the style swap), retrieval precision and content similarity, with the weakest
    database. `pipe` is an rdm.sampling.pipeline.RDMPipeline; `control` its rdm.sampling.conditioning.NeighbourControl (diversity,
    negatives ...). Each row also has the probe's mean probability of every database per database sampled from
    ("probe"), and the mean pairwise cosine of the neighbours the prompts retrieve ("neighbour_cosine")."""
    from .conditioning import NeighbourControl, retrieve
    from .selection import mean_pairwise_cosine

    control = control or NeighbourControl()
    k = pipe.rdm_config.k if k is None else k
    names = check_databases(databases, None)
    if not prompts or not seeds:
        raise RDMError("the style swap needs at least one prompt and one seed")
    probe = train_probe(databases, options)
    jobs = [(p, s) for s in seeds for p in prompts]
    queries = pipe.embedder.encode_text(list(prompts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k beyond a small database: said by the sampling below
        cosine = float(np.mean([mean_pairwise_cosine(retrieve(queries, [(db, 1.0)], k, None,
                                                              control.selection).embeddings) for db in databases]))
    rows = []
    for cell in cells:
        per_db = {}
        for name, db in zip(names, databases):
            out = pipe([p for p, _ in jobs], databases=db, seed=[s for _, s in jobs], output_type="pil",
                       num_inference_steps=cell.steps, guidance_scale=cell.guidance, scheduler=cell.scheduler,
                       guidance_rescale=cell.guidance_rescale, style_scale=cell.style_scale, eta=cell.eta, k=k,
                       control=control)
            report = score_images(out.images, databases, replace(options, target=name), embedder=pipe.embedder,
                                  prompts=[p for p, _ in jobs], probe=probe)
            per_db[name] = {key: report.summary[key] for key in ("probe_accuracy", "retrieval_precision", "content",
                                                                  "probe")}
        mean = {key: float(np.mean([d[key] for d in per_db.values()]))
                for key in ("probe_accuracy", "retrieval_precision", "content")}
        weakest = min(per_db, key=lambda n: per_db[n]["probe_accuracy"])
        rows.append({**asdict(cell), "images": len(jobs) * len(names), **mean, "weakest": weakest,
                     "weakest_probe_accuracy": per_db[weakest]["probe_accuracy"], "databases": per_db,
                     "neighbour_cosine": cosine, "control": control.to_dict(),
                     "probe_heldout_accuracy": probe.heldout_accuracy})
        if log:
            log(swap_line(rows[-1]))
    return rows


def swap_line(row: dict) -> str:
    """One cell of a style-swap run as a line of text."""
    return (f"{row['label']:<30} style-swap (probe) {row['probe_accuracy']:.3f}  retrieval precision "
            f"{row['retrieval_precision']:.3f}  content {row['content']:.3f}  weakest {row['weakest']} "
            f"{row['weakest_probe_accuracy']:.3f}  neighbours' mean cosine {row['neighbour_cosine']:.3f}")
