"""The process's one pipeline, its embedder and the database registry: queries in, neighbours, images out.

Request threads embed queries and retrieve neighbours (so a bad filter or an unknown database is a
4xx before anything is queued, and a takedown committed meanwhile is honoured); the job worker hands
whole batches of prepared rows to `sample`, one pipeline call per batch: queries (B, D), neighbours
(B, k, D) and one seed per row, so rows of different requests, prompts and databases share each
U-Net call. Each row's provenance is then completed with what the pipeline did not see: the original
query, the databases and hits of that row, its filters and warnings.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..db.retrieval import DatabaseRegistry, DatabaseRetriever
from ..errors import DatabaseError, RDMError
from ..sampling import conditioning as cond
from ..sampling import copyguard, credentials
from ..sampling.pipeline import RDMPipeline, check_sampler, make_scheduler
from ..sampling.selection import Selection
from .config import ServeConfig
from .images import budgeted, decode_budget, decode_query_image, png_bytes
from .validation import BadRequest, DatabaseChoice, refusal

MAX_ADAPTER_WEIGHT = 4.0  # |weight| of an adapter in a request


@dataclass(frozen=True)
class Settings:
    """What rows must share to run in one pipeline call (the batch key)."""

    k: int  # neighbours in every row's context: the context tensor is (B, 1+k, D)
    steps: int  # one timestep schedule per call
    guidance: float  # one guidance scale per call
    scheduler: str | None  # one sampler per call
    eta: float
    guidance_rescale: float
    height: int  # one latent shape per call
    width: int
    control: cond.NeighbourControl = field(default_factory=cond.NeighbourControl)  # negatives, window, ...
    edit: tuple | None = None  # image-to-image: (input sha256, strength, mask sha256, feather) shared by the call
    adapters: tuple = ()  # ((served adapter name, weight), ...): one U-Net state per call


@dataclass
class Row:
    """One image to make: its query, its neighbours and its seed, ready for the pipeline."""

    query: np.ndarray  # (D,) unit vector
    neighbours: np.ndarray  # (k, D) the stored vectors, most similar first
    hits: list[dict]  # the k neighbours' records (database, id, score, row, metadata)
    drawn: list[dict]  # per database: name, fingerprint, weight, count, k_asked, k_drawn
    notes: list[str]  # retrieval warnings (k clamped, few filter matches)
    weights: np.ndarray | None  # (k,) each neighbour's attention weight; None: all 1
    where: dict  # filters applied inside the searches
    seed: int
    query_record: dict  # {"prompt": ...} | {"image": ...} | {"embedding": True}
    settings: Settings
    label: str = ""  # the row's databases, for compare views
    job: Any = None  # the Job it belongs to
    index: int = 0  # position in the job
    step: int = 0  # denoising steps done
    edit: Any = None  # the prepared rdm.sampling.editing.Edit (its image, mask and record) when editing an image


@dataclass
class Output:
    png: bytes
    provenance: dict
    width: int
    height: int
    hits: list[dict] = field(default_factory=list)


class Cancelled(Exception):
    """Raised from the step callback to stop a batch nobody waits for any more."""


class Engine:
    def __init__(self, pipe: RDMPipeline, registry: DatabaseRegistry, config: ServeConfig):
        self.pipe = pipe
        self.registry = registry
        self.config = config
        self.decode_budget = decode_budget(config)  # bytes of image decoding in flight, all requests together
        self._embedder_lock = threading.Lock()
        self.embedder  # load the CLIP now, not on the first request
        self.identity = (credentials.SigningIdentity.resolve(config.sign_key, config.sign_cert)
                         if config.credentials else None)  # refused at start, not at the first image
        self.adapters = self._load_adapters(config.adapters)  # served name -> rdm.models.adapters.AdapterInfo

    def _load_adapters(self, specs) -> dict:
        """Every adapter the service offers, loaded into the U-Net once, at start (a wrong one stops the start)."""
        served = {}
        for spec in specs:
            info = self.pipe.load_adapter(spec)
            if info.name in served:
                raise RDMError(f"two adapters are named {info.name}: serve each name once")
            served[info.name] = info
        return served

    def adapter_choice(self, choices) -> tuple:
        """A request's adapters [{name, weight}] as Settings.adapters; 404 for one not served, 422 for a bad weight."""
        out = []
        for c in choices or []:
            if c.name not in self.adapters:
                served = ", ".join(sorted(self.adapters)) or "none"
                raise BadRequest(404, f"no adapter {c.name!r} is served here (served: {served})")
            if not math.isfinite(c.weight) or abs(c.weight) > MAX_ADAPTER_WEIGHT:
                raise BadRequest(422, f"the weight of adapter {c.name} must be in [-{MAX_ADAPTER_WEIGHT:g}, "
                                      f"{MAX_ADAPTER_WEIGHT:g}]")
            out.append((c.name, float(c.weight)))
        if len({n for n, _ in out}) != len(out):
            raise BadRequest(422, "an adapter is listed twice: give each once with its weight")
        return tuple((n, w) for n, w in out if w != 0.0)  # weight 0 is the base model: batched with it

    @property
    def embedder(self):
        with self._embedder_lock:
            return self.pipe.embedder

    @property
    def dim(self) -> int:
        return self.pipe.rdm_config.embedding_dim

    # -- databases ------------------------------------------------------------------------------------
    def database(self, name: str) -> DatabaseRetriever:
        """A served database whose vectors come from the model's CLIP; 404 / 409 otherwise."""
        if not isinstance(name, str) or not name:
            raise BadRequest(422, "give a database name")
        try:
            db = self.registry.get(name)
        except DatabaseError as e:
            if "no database" in str(e):  # not the registry's list of what is served: a key may not see it all
                raise BadRequest(404, f"no database {name!r} is served here") from None
            raise BadRequest(404 if "no longer available" in str(e) else 409, str(e)) from None
        if not self.embedder.identity.same_vectors_as(db.identity):
            raise BadRequest(409, f"database {name} was built with {db.identity.describe()}, but this service's model "
                                  f"uses {self.embedder.identity.describe()}; it cannot be searched here")
        return db

    def compatible(self, db: DatabaseRetriever) -> bool:
        return self.embedder.identity.same_vectors_as(db.identity)

    # -- queries --------------------------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        return self.embedder.encode_text([text])  # (1, D)

    def editable_image(self, data: bytes):
        """An upload's pixels kept for editing: decoded as queries are, the longest side capped at twice the model's
        resolution (at least 512), so that a kept upload costs at most a few megabytes. Decoded under the decode
        budget (503 when it stays full, 413 for an image costing more than all of it)."""
        from PIL import Image

        from ..images.decode import DecodeOptions, Undecodable, decode_image

        if len(data) > self.config.max_upload_bytes:
            raise BadRequest(413, f"image is larger than the upload limit of {self.config.max_upload_bytes} bytes")
        data = bytes(data)
        try:
            with budgeted(data, self.config, self.decode_budget):
                image = decode_image(data, DecodeOptions(max_pixels=self.config.max_pixels))
                cap = max(512, 2 * self.pipe.rdm_config.resolution)
                if max(image.size) > cap:
                    image.thumbnail((cap, cap), Image.Resampling.LANCZOS)
                return image
        except Undecodable as e:
            raise BadRequest(400, f"cannot use this image: {e.reason} ({e.detail or 'no detail'})") from None

    def embed_image_bytes(self, data: bytes) -> tuple[np.ndarray, tuple]:
        pixels, size = decode_query_image(data, self.embedder.pixel_transform, self.config, self.decode_budget)
        return self.embedder.encode_pixels(np.array(pixels[None])), size  # (1, D)

    def item(self, database: str, item_id: str) -> tuple[dict, np.ndarray]:
        """(record, stored vector (D,)) of a database item; 404 when there is none."""
        db = self.database(database)
        found = db.lookup(item_id)
        if found is None:
            raise BadRequest(404, f"database {database} has no item {item_id!r}")
        return found

    # -- retrieval ------------------------------------------------------------------------------------
    def neighbours(self, query: np.ndarray, choices: Sequence[DatabaseChoice], k: int,
                   where: dict | None, selection: Selection = Selection(), weighting: str = "uniform") -> cond.Neighbours:
        """k neighbours of each query (Q, D) from the chosen databases, in proportion to their weights, chosen by
        the selection (diversity, duplicates, max-per) and weighed by the weighting."""
        if not choices or k == 0:
            return cond.Neighbours(np.zeros((len(query), 0, self.dim), np.float32),
                                   np.zeros((len(query), 0), np.float32), [[] for _ in range(len(query))])
        merged: dict[str, float] = {}
        for c in choices:  # a database listed twice draws with the sum of its weights
            merged[c.name] = merged.get(c.name, 0.0) + c.weight
        sources = [(self.database(name), weight) for name, weight in merged.items()]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", cond.RetrievalWarning)  # kept in Neighbours.notes
                return cond.neighbour_weights(cond.retrieve(query, sources, k, where, selection), weighting)
        except RDMError as e:
            raise refusal(e) from None

    def copy_check(self, row: Row, image) -> dict:
        """The copy guard's verdict on one output: its neighbours and the nearest item of each database it drew
        from (rdm.sampling.copyguard)."""
        sources = [(self.database(d["name"]), 1.0) for d in row.drawn if d.get("k_drawn")]
        neighbours = np.asarray(row.neighbours, np.float32).reshape(1, -1, self.dim)
        return copyguard.check([image], self.embedder, neighbours, [row.hits], sources,
                               copyguard.CopyGuard(self.config.copy_threshold))[0]

    # -- settings -------------------------------------------------------------------------------------
    def settings(self, k: int, steps: int | None, guidance: float | None, scheduler: str | None,
                 eta: float | None, guidance_rescale: float | None = None,
                 control: cond.NeighbourControl | None = None) -> Settings:
        """Checked sampler settings, the model's own (rdm.models.format.SamplingDefaults) for each one not given (the
        scheduler and the model's learned null context must accept them)."""
        config, own = self.pipe.rdm_config, self.pipe.sampling_defaults
        steps = own.num_inference_steps if steps is None else steps
        guidance = own.guidance_scale if guidance is None else guidance
        scheduler = own.scheduler if scheduler is None else scheduler
        eta = own.eta if eta is None else eta
        guidance_rescale = own.guidance_rescale if guidance_rescale is None else guidance_rescale
        try:
            check_sampler(make_scheduler(scheduler, self.pipe.scheduler), steps)
        except RDMError as e:
            raise BadRequest(422, str(e)) from None
        if not config.query_token and k == 0:
            raise BadRequest(422, "this model is conditioned on neighbours only: choose at least one database")
        null = self.pipe.null_context
        if config.unconditional == "learned" and guidance != 1.0 and null is not None \
                and null.shape[0] not in (1, k + int(config.query_token)):
            raise BadRequest(422, f"this model's learned unconditional context fits k = "
                                  f"{null.shape[0] - int(config.query_token)} neighbours only")
        return Settings(k=k, steps=steps, guidance=float(guidance), scheduler=scheduler, eta=float(eta),
                        guidance_rescale=float(guidance_rescale), height=config.resolution, width=config.resolution,
                        control=control or cond.NeighbourControl())

    # -- sampling -------------------------------------------------------------------------------------
    def honour_takedowns(self, row: Row) -> None:
        """Neighbours were retrieved when the job was submitted: one removed since (a takedown) is dropped from the
        row right before sampling (its context slot zeroed, moved last, as a missing neighbour is) and the job
        says so."""
        gone = []
        for j, hit in enumerate(row.hits):
            name, item = hit.get("database"), hit.get("id")
            if name is None or item is None:  # a reference image, not a database item
                continue
            try:
                live = self.database(name).lookup(item) is not None
            except (BadRequest, RDMError):
                live = False  # the database itself is gone
            if not live:
                gone.append(j)
        if not gone:
            return
        dropped = set(gone)
        keep = [j for j in range(len(row.hits)) if j not in dropped]
        vectors = np.asarray(row.neighbours, np.float32)
        # the live neighbours first, in order, then zeros: the padding a search that found fewer items gives
        row.neighbours = np.concatenate([vectors[keep], np.zeros((len(gone), vectors.shape[1]), np.float32)])
        if row.weights is not None:
            weights = np.asarray(row.weights, np.float32)
            row.weights = np.concatenate([weights[keep], np.zeros(len(gone), np.float32)])
        removed = [f"{row.hits[j]['database']}/{row.hits[j]['id']}" for j in gone]
        row.hits = [row.hits[j] for j in keep]
        row.notes = list(row.notes) + [f"removed after the job was submitted (takedown), not used: {', '.join(removed)}"]

    def sample(self, rows: Sequence[Row], on_step: Callable[[int], None]) -> list[Output]:
        """One pipeline call for rows sharing their Settings; on_step(i) after each step may raise Cancelled."""
        s = rows[0].settings
        assert all(r.settings == s for r in rows)
        for row in rows:
            self.honour_takedowns(row)
        weights = None if all(r.weights is None for r in rows) else np.stack(
            [np.ones(s.k, np.float32) if r.weights is None else r.weights for r in rows])
        given = cond.Neighbours(np.stack([r.neighbours for r in rows]).reshape(len(rows), s.k, self.dim),
                                np.zeros((len(rows), s.k), np.float32), [r.hits for r in rows], weights=weights)
        e = rows[0].edit
        editing = {} if e is None else {"init_image": e.image, "strength": e.strength, "mask_image": e.hard_mask,
                                        "mask_feather": e.feather}
        self.pipe.set_adapters([(self.adapters[name], weight) for name, weight in s.adapters])  # no file read
        out = self.pipe(query_embeds=np.stack([r.query for r in rows]),  # (B, D)
                        neighbor_embeds=given, control=s.control, **editing,
                        seed=[r.seed for r in rows], num_inference_steps=s.steps, guidance_scale=s.guidance,
                        scheduler=s.scheduler, eta=s.eta, guidance_rescale=s.guidance_rescale, height=s.height, width=s.width, output_type="pil",
                        callback=lambda i, _t, _latents: on_step(i + 1),
                        copy_guard=None)  # checked per row below, against that row's own collections
        outputs = []
        for row, image, record in zip(rows, out.images, out.provenance):
            prov = record.to_dict()
            prov.update(query=row.query_record, databases=row.drawn, neighbours=row.hits, where=row.where,
                        k=len(row.hits), index=row.index, warnings=list(row.notes))
            if row.edit is not None:  # the upload's own digest and settings, not the working copy's
                prov["edit"] = {**row.edit.record(), "steps_run": prov["edit"]["steps_run"],
                                "query_from": row.query_record.get("from", "prompt")}
            prov["copy_guard"] = self.copy_check(row, image)
            png = png_bytes(image)
            if self.identity is not None:
                png = credentials.embed(png, prov, self.identity, title=f"rdm-seed{prov.get('seed')}.png")
            outputs.append(Output(png, prov, image.width, image.height, row.hits))
        return outputs
