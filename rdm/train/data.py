"""Training examples for a retrieval-augmented diffusion model, computed once and cached.

Each training image becomes (as in RDM training, Blattmann et al. 2022, Sec. 3.2):
  1. a square crop at the model's resolution                     (reader: `read_crops`)
  2. its own CLIP image embedding, computed from the full-resolution
     image exactly as the database embeds it, so that the image and
     its copies score 1.0 against it; the neighbours are mined
     with it, and it is the query token of query="image"   (mapper: `Embedder.encode_image_files`)
     with query="text" or "mixed", also the CLIP text embedding
     of its caption: the kind of query a prompt gives            (mapper: `prepare_text_queries`)
  3. its autoencoder posterior (mean, logvar), or in pixel space
     the uint8 pixels themselves                                 (mapper: `encode_latents`)
  4. the rows of its k nearest database items, leaving out the
     image itself and near-duplicates above a cosine threshold,
     which would let the model learn to copy a neighbour         (`mine_neighbours`)

The cache (writer) has two levels, so that a second database reuses the embeddings and latents:

    CACHE/images-<key>/               key: source content (captions included) + embedder weights + autoencoder
        manifest.json                      weights + resolution; manifest: what the key was made of, count, skipped
        ids.json  captions.json  query.npy (N, D)  latents.npy (N, 2C, h, w) float32 or (N, 3, R, R) uint8
        text_query.npy (N, D)  has_caption.npy (N,)   added when a run first trains on text queries
        neighbours-<key>/             key: database fingerprint + k + threshold
            manifest.json  rows.npy (N, k) int64, -1 = none  scores.npy (N, k)  ids.json

Every folder (and each file added later) is written to a temporary name and renamed when complete, so
a reader never finds a half-written cache. CACHE is `cache_dir`, else $RDM_CACHE/train, else ~/.cache/rdm/train.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..db import store
from ..db.database import Database
from ..embed.embedder import Embedder, weights_checksum
from ..errors import RDMError, SourceError
from ..images.decode import DecodeOptions, Undecodable, decode_image
from ..sources import Source

BLOCK = 64  # images decoded, embedded and encoded together
CACHE_VERSION = 2  # bumped when the cached arrays change meaning (2: captions.json; metadata files in the key)
QUERY_KINDS = ("image", "text", "mixed")  # what the query token of a training example is (TrainingData.query_tokens)
MIXED_TEXT_PROB = 0.5  # "mixed": chance that an example's query is its caption's text embedding
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this range


@dataclass
class MinedNeighbours:
    """The database rows that condition each training image."""

    rows: np.ndarray  # (N, k) int64 database rows, nearest first, -1 where fewer than k qualify
    scores: np.ndarray  # (N, k) float32 cosine similarities, -inf where rows are -1
    ids: list[list[str]]  # database ids of the rows, for inspection
    excluded_self: int  # hits left out because they were the training image itself (same id)
    excluded_duplicates: int  # hits left out because their similarity reached the threshold

    @property
    def counts(self) -> np.ndarray:
        """(N,) number of valid neighbours of each image."""
        return (self.rows >= 0).sum(1)


@dataclass
class TrainingData:
    """Everything a training step reads, in memory (or memory-mapped)."""

    ids: list[str]  # source ids of the training images
    query: np.ndarray  # (N, D) float32 unit CLIP embeddings of the images (the neighbours were mined with these)
    latents: np.ndarray  # (N, 2C, h, w) float32 posterior mean and logvar, or (N, 3, R, R) uint8 pixels
    neighbours: MinedNeighbours  # (N, k) database rows
    neighbour_vectors: np.ndarray  # (N, k, D) float32 stored vectors of the neighbours, zeros for -1
    space: str  # "latent" or "pixel"
    cache: Path  # the images-<key> folder
    text_query: np.ndarray | None = None  # (N, D) float32 unit CLIP text embeddings of the captions, the image's
    #                                       embedding where an image has no caption; None unless loaded
    has_caption: np.ndarray | None = None  # (N,) bool: which images have a caption (text_query is theirs)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return self.neighbours.rows.shape[1]

    def query_tokens(self, index: np.ndarray, kind: str, generator: torch.Generator) -> torch.Tensor:
        """(B, D) query tokens: the images' CLIP embeddings ("image"), their captions' ("text"), or per example
        the caption's with probability MIXED_TEXT_PROB, else the image's ("mixed", drawn from `generator`)."""
        if kind not in QUERY_KINDS:
            raise RDMError(f"the query must be one of {QUERY_KINDS}, got {kind!r}")
        image = torch.from_numpy(self.query[index])  # (B, D)
        if kind == "image":
            return image
        if self.text_query is None:
            raise RDMError(f"{kind} queries need the captions' text embeddings: prepare the training data with "
                           f"query={kind!r}")
        text = torch.from_numpy(self.text_query[index])  # (B, D)
        if kind == "text":
            return text
        pick = torch.rand(len(index), generator=generator) < MIXED_TEXT_PROB  # (B,)
        return torch.where(pick[:, None], text, image)

    def x0(self, index: np.ndarray, generator: torch.Generator, scale: float) -> torch.Tensor:
        """(B, C, h, w) clean U-Net inputs: a posterior sample times `scale`, or pixels in [-1, 1]."""
        batch = torch.from_numpy(np.ascontiguousarray(self.latents[index]))
        if self.space == "pixel":
            return batch.float().div_(127.5).sub_(1.0)
        mean, logvar = batch.float().chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator)
        return (mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * eps) * scale


# --- keys and the cache --------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$RDM_CACHE/train, else ~/.cache/rdm/train."""
    return Path(os.environ.get("RDM_CACHE") or Path.home() / ".cache" / "rdm").expanduser() / "train"


def digest(obj) -> str:
    """Short sha256 of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # a folder's captions (rdm.sources.FolderSource)


def source_fingerprint(source: Source) -> dict:
    """What identifies a source's content: its description plus names, sizes and mtimes, and the
    captions file's bytes (folders), or the dataset's own fingerprint (Hugging Face datasets)."""
    desc = {k: v for k, v in source.describe().items() if k != "added"}
    if source.kind != "images":
        raise SourceError(f"training needs images, but {desc.get('path') or desc} holds precomputed embeddings")
    files = getattr(source, "files", None)
    if files is not None:  # FolderSource
        h = hashlib.sha256()
        for rel in files:
            st = (source.root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for name in METADATA_FILES:  # captions change -> key changes
            if (source.root / name).is_file():
                h.update(f"{name}\0".encode() + hashlib.sha256((source.root / name).read_bytes()).digest())
        return dict(desc, content=h.hexdigest())
    dataset = getattr(source, "dataset", None)
    return dict(desc, content=getattr(dataset, "_fingerprint", None), count=len(source))


def vae_checksum(vae) -> str:
    """sha256 of the autoencoder's float32 weights, "pixel" without one."""
    return "pixel" if vae is None else weights_checksum(vae)


def _write_folder(final: Path, files: dict[str, object]) -> Path:
    """Write {name: ndarray | JSON-able} into `final` atomically (temporary folder, then rename)."""
    with store.atomic_folder(final, exists="keep") as tmp:  # another process finished first: theirs is as good
        for name, value in files.items():
            if isinstance(value, np.ndarray):
                np.save(tmp / name, value, allow_pickle=False)
            else:
                (tmp / name).write_text(json.dumps(value, indent=1) + "\n")
    return final


def _complete(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / n).is_file() for n in names)


# --- 1. reading crops ----------------------------------------------------------------------------

def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """The centre square of an image, resized to `resolution` (bicubic, antialiased): uint8 (R, R, 3),
    the view LDM trains on and the one CLIP's shortest-side resize + centre crop embeds."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(square.convert("RGB"), np.uint8)


def caption_text(value) -> str | None:
    """An item's caption as one string: the text, the first non-empty one of a list, None when there is none."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_images(source: Source, limit: int | None = None, block: int = BLOCK, skipped: list | None = None,
                captions: list | None = None, payloads: list | None = None
                ) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """Blocks of (ids, decoded full-size RGB images) in source order; undecodable images go to `skipped`, the
    captions of the decoded ones (None: none) to `captions`, and, given `payloads`, each block's payloads
    (path or bytes) replace its contents, for embedding the way databases do (Embedder.encode_image_files)."""
    ids, images = [], []
    if payloads is not None:
        payloads.clear()
    for n, item in enumerate(source.iter_items()):
        if limit is not None and n >= limit:
            break
        try:
            images.append(decode_image(item.payload, DecodeOptions()))
            ids.append(item.id)
            if captions is not None:
                captions.append(caption_text(item.meta.get("caption")))
            if payloads is not None:
                payloads.append(item.payload)
        except Undecodable as e:
            if skipped is not None:
                skipped.append({"id": item.id, "reason": e.reason, "detail": e.detail})
            continue
        if len(ids) == block:
            yield ids, images
            ids, images = [], []
            if payloads is not None:
                payloads.clear()
    if ids:
        yield ids, images


def read_crops(source: Source, resolution: int, limit: int | None = None, block: int = BLOCK,
               skipped: list | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """Blocks of (ids, uint8 (n, R, R, 3) centre crops) in source order."""
    for ids, images in read_images(source, limit, block, skipped):
        yield ids, np.stack([center_crop(im, resolution) for im in images])


# --- 2./3. embeddings and latents ----------------------------------------------------------------

def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [-1, 1], the autoencoder's input range."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def encode_latents(vae, pixels: np.ndarray, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """Posterior parameters (n, 2C, h, w) = cat(mean, logvar) of uint8 crops (n, R, R, 3)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        x = to_unit_range(pixels[i:i + batch_size]).to(device, vae.dtype)
        dist = vae.encode(x).latent_dist
        out.append(torch.cat([dist.mean, dist.logvar], dim=1).float().cpu().numpy())
    return np.concatenate(out)


def latent_scale_factor(latents: np.ndarray, seed: int = 0, max_items: int = 4096) -> float:
    """1 / std of posterior samples, so that scaled latents have unit variance (LDM `scale_by_std`,
    `ldm/models/diffusion/ddpm.py` LatentDiffusion.on_train_batch_start)."""
    rng = np.random.default_rng(seed)
    pick = latents[: max_items]
    mean, logvar = np.split(np.asarray(pick, np.float64), 2, axis=1)
    sample = mean + np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE)) * rng.standard_normal(mean.shape)
    std = float(sample.std())
    if not np.isfinite(std) or std <= 0:
        raise RDMError(f"the autoencoder's latents have standard deviation {std}; is it a trained AutoencoderKL?")
    return 1.0 / std


# --- 4. neighbours -------------------------------------------------------------------------------

def exclude_self_and_duplicates(scores: np.ndarray, rows: np.ndarray, own_ids: Sequence[str] | None,
                                db_ids: Sequence[str], k: int, threshold: float
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keep the k best hits of each query that are not the query itself (same id, when `own_ids` is
    given) and whose similarity is below `threshold`.

    Returns (scores (Q, k), rows (Q, k), self hits (Q,), duplicate hits (Q,)); rows are -1 where
    fewer than k hits qualify.
    """
    q = len(rows)
    out_rows = np.full((q, k), -1, np.int64)
    out_scores = np.full((q, k), -np.inf, np.float32)
    n_self, n_dup = np.zeros(q, np.int64), np.zeros(q, np.int64)
    for i in range(q):
        kept = 0
        for r, s in zip(rows[i], scores[i]):
            if r < 0 or kept == k:
                break
            if own_ids is not None and db_ids[r] == own_ids[i]:
                n_self[i] += 1
            elif s >= threshold:
                n_dup[i] += 1
            else:
                out_rows[i, kept], out_scores[i, kept] = r, s
                kept += 1
    return out_scores, out_rows, n_self, n_dup


def same_collection(source_desc: dict, db: Database) -> bool:
    """True when the database was built from this source, so that equal ids mean the same image."""
    keys = ("type", "path", "name", "split")
    mine = {key: source_desc.get(key) for key in keys}
    return any({key: s.get(key) for key in keys} == mine for s in db.manifest.get("sources", []))


def mine_neighbours(queries: np.ndarray, own_ids: Sequence[str] | None, db: Database, k: int,
                    threshold: float) -> MinedNeighbours:
    """The k nearest database items of each query, without itself and near-duplicates (>= threshold).

    Searches k plus a margin, and searches again, four times deeper, for the queries that lost too
    many hits, until each has k neighbours or the whole database was looked at.
    """
    if not 0.0 < threshold <= 1.0:
        raise RDMError(f"the near-duplicate threshold is a cosine similarity in (0, 1], got {threshold}")
    if k < 1:
        raise RDMError(f"k must be at least 1, got {k}")
    db_ids = db.ids
    n = len(queries)
    scores = np.full((n, k), -np.inf, np.float32)
    rows = np.full((n, k), -1, np.int64)
    n_self = n_dup = 0
    todo = np.arange(n)
    depth = min(db.count, 2 * k + 8)
    while len(todo):
        found = db.search(queries[todo], k=depth, records=False)  # rows and scores only
        own = [own_ids[i] for i in todo] if own_ids is not None else None
        s, r, ns, nd = exclude_self_and_duplicates(found.scores, found.rows, own, db_ids, k, threshold)
        done = ~((r < 0).any(1) & (depth < db.count))
        scores[todo[done]], rows[todo[done]] = s[done], r[done]
        n_self, n_dup = n_self + int(ns[done].sum()), n_dup + int(nd[done].sum())
        todo = todo[~done]
        depth = min(db.count, depth * 4)
    ids = [[db_ids[r] for r in row if r >= 0] for row in rows]
    return MinedNeighbours(rows=rows, scores=scores, ids=ids, excluded_self=n_self, excluded_duplicates=n_dup)


# --- the whole preparation -----------------------------------------------------------------------

def image_cache_key(source: Source, embedder: Embedder, vae, resolution: int, limit: int | None) -> dict:
    """What the images-<key> folder depends on."""
    ident = embedder.identity
    return {"version": CACHE_VERSION, "source": source_fingerprint(source),
            "embedder": {"model": ident.model, "weights_sha256": ident.weights_sha256, "preprocess": ident.preprocess},
            "vae": vae_checksum(vae), "resolution": resolution, "limit": limit}


def prepare_images(source: Source, embedder: Embedder, vae, resolution: int, cache_dir: Path,
                   limit: int | None = None, device: torch.device | str = "cpu", progress: bool = True) -> Path:
    """Compute (or find) the images-<key> cache folder: ids, captions, image embeddings, latents."""
    key = image_cache_key(source, embedder, vae, resolution, limit)
    folder = Path(cache_dir) / f"images-{digest(key)}"
    if _complete(folder, ("manifest.json", "ids.json", "captions.json", "query.npy", "latents.npy")):
        return folder
    device = torch.device(device)
    ids, captions, queries, latents, skipped = [], [], [], [], []
    total = len(source) if limit is None else min(limit, len(source))
    bar = tqdm(total=total if total >= 0 else None, desc="embedding training images", unit="img",
               disable=not progress)
    payloads: list = []
    for block_ids, block in read_images(source, limit, skipped=skipped, captions=captions, payloads=payloads):
        ids += block_ids
        crops = np.stack([center_crop(im, resolution) for im in block])  # (n, R, R, 3)
        queries.append(embedder.encode_image_files(payloads))  # decoded as the database decodes: the same vector
        latents.append(crops.transpose(0, 3, 1, 2).copy() if vae is None else encode_latents(vae, crops, device))
        bar.update(len(block_ids))
    bar.close()
    if not ids:
        raise SourceError(f"no training image could be read from {source.describe()} "
                          f"({len(skipped)} skipped, e.g. {skipped[:3]})")
    if len(set(ids)) != len(ids):
        raise SourceError("the training source has repeated ids")
    manifest = dict(key, count=len(ids), skipped=skipped, space="pixel" if vae is None else "latent",
                    captions=sum(c is not None for c in captions))
    return _write_folder(folder, {"manifest.json": manifest, "ids.json": ids, "captions.json": captions,
                                  "query.npy": np.concatenate(queries).astype(np.float32),
                                  "latents.npy": np.concatenate(latents)})


def _add_array(folder: Path, name: str, array: np.ndarray) -> None:
    """Add one array to a finished cache folder atomically (temporary file, then rename)."""
    store.atomic_write(folder / name, lambda f: np.save(f, array, allow_pickle=False))


def prepare_text_queries(images: Path, embedder: Embedder) -> Path:
    """Add the captions' CLIP text embeddings to an images cache folder (once): text_query.npy (N, D), the
    image's own embedding where an image has no caption, and has_caption.npy (N,) bool.

    The folder's key already covers the captions (source_fingerprint) and the embedder's weights, so
    the added files stay as valid as the rest of the folder.
    """
    if _complete(images, ("text_query.npy", "has_caption.npy")):
        return images
    captions = json.loads((images / "captions.json").read_text())
    has_caption = np.array([c is not None for c in captions], bool)
    text_query = np.load(images / "query.npy")  # (N, D), rows without a caption keep the image embedding
    if has_caption.any():
        text_query[has_caption] = embedder.encode_text([c for c in captions if c is not None])
    _add_array(images, "has_caption.npy", has_caption)
    _add_array(images, "text_query.npy", text_query.astype(np.float32))  # last: its presence marks completion
    return images


def prepare_neighbours(images: Path, db: Database, k: int, threshold: float) -> Path:
    """Compute (or find) the neighbours-<key> folder inside an images cache folder."""
    manifest = json.loads((images / "manifest.json").read_text())
    key = {"database": db.fingerprint, "k": k, "threshold": threshold,
           "same_collection": same_collection(manifest["source"], db)}
    folder = images / f"neighbours-{digest(key)}"
    if _complete(folder, ("manifest.json", "rows.npy", "scores.npy", "ids.json")):
        return folder
    own_ids = json.loads((images / "ids.json").read_text()) if key["same_collection"] else None
    nb = mine_neighbours(np.load(images / "query.npy"), own_ids, db, k, threshold)
    info = dict(key, database_name=db.name, excluded_self=nb.excluded_self,
                excluded_duplicates=nb.excluded_duplicates, fewer_than_k=int((nb.counts < k).sum()))
    return _write_folder(folder, {"manifest.json": info, "rows.npy": nb.rows, "scores.npy": nb.scores,
                                  "ids.json": nb.ids})


def load_training_data(images: Path, neighbours: Path, db: Database, mmap: bool = False) -> TrainingData:
    """Read a prepared cache; neighbour vectors are gathered from the database (same fingerprint); the text
    queries when they were prepared."""
    info = json.loads((neighbours / "manifest.json").read_text())
    if info["database"] != db.fingerprint:
        raise RDMError(f"neighbour cache {neighbours} belongs to another version of database {db.name}")
    rows = np.load(neighbours / "rows.npy")
    nb = MinedNeighbours(rows=rows, scores=np.load(neighbours / "scores.npy"),
                    ids=json.loads((neighbours / "ids.json").read_text()),
                    excluded_self=info["excluded_self"], excluded_duplicates=info["excluded_duplicates"])
    manifest = json.loads((images / "manifest.json").read_text())
    text = _complete(images, ("text_query.npy", "has_caption.npy"))
    return TrainingData(ids=json.loads((images / "ids.json").read_text()),
                        query=np.load(images / "query.npy"),
                        latents=np.load(images / "latents.npy", mmap_mode="r" if mmap else None),
                        neighbours=nb, neighbour_vectors=db.vectors_at(rows), space=manifest["space"], cache=images,
                        text_query=np.load(images / "text_query.npy") if text else None,
                        has_caption=np.load(images / "has_caption.npy") if text else None)


def prepare_training_data(source: Source, db: Database, embedder: Embedder, vae, resolution: int, k: int,
                          threshold: float, cache_dir: str | Path | None = None, limit: int | None = None,
                          device: torch.device | str = "cpu", progress: bool = True,
                          query: str = "image") -> TrainingData:
    """Crops, query embeddings, latents and neighbours of every training image, cached (see module doc);
    with `query` "text" or "mixed" also the captions' text embeddings."""
    if query not in QUERY_KINDS:
        raise RDMError(f"the query must be one of {QUERY_KINDS}, got {query!r}")
    if not embedder.identity.same_vectors_as(db.identity):
        raise RDMError(f"database {db.name} was built with {db.identity.describe()}, but the training queries "
                       f"would be embedded with {embedder.identity.describe()}; use the database's CLIP")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    images = prepare_images(source, embedder, vae, resolution, cache, limit, device, progress)
    if query != "image":
        if not json.loads((images / "manifest.json").read_text())["captions"]:
            raise RDMError(f"query={query!r} trains on the captions' text embeddings, but no training image has a "
                           f"caption: give a folder with a metadata.jsonl or metadata.csv holding a caption column "
                           f"(rdm toyart writes one), a dataset with a caption column, or use query='image'")
        prepare_text_queries(images, embedder)
    neighbours = prepare_neighbours(images, db, k, threshold)
    return load_training_data(images, neighbours, db)
