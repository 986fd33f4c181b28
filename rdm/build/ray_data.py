"""The build's stages as a Ray Data pipeline: `rdm build-index SOURCE --engine ray [--ray-address ADDR]`.

The same stage functions as the local engine (rdm.build), run by Ray instead of one process:

  shards   the driver cuts the source's items into shards of batch_size x batches_per_shard items
           (fewer batches where that gives each actor under SHARDS_PER_ACTOR shards), numbered
           k = 0, 1, ... by source position (within the local engine's segment boundaries), and
           leaves out those an interrupted build already finished (NAME/.build/progress.json)
  read     a CPU task per shard: `read_batches(source, lo, hi, batch_size)`             (rdm.build)
  decode   the same task: `decode_batch` on each batch, torch-free                      (rdm.images.pixels)
  embed    an actor pool (`map_batches` with a callable class): one model per actor, num_gpus=1
           each where the cluster has GPUs, CPU actors otherwise: `embed_batch`          (rdm.build)
  write    the actor writes the shard as one segment into the database folder, which every node
           must reach (shared storage): `write_segment`                                (rdm.db.segment)
  commit   the driver records each finished segment in the progress file as it arrives, orders them
           by k (rows follow source order, as in the local engine), then indexes and commits with
           the local engine's code.
A killed driver loses at most the shards in flight: `--resume` reuses every recorded segment.
Ray is imported here only, and only when this engine runs (`pip install "rdm[ray]"`).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..db.manifest import fault, rows_to_table, skipped_table
from ..db.segment import write_segment
from ..errors import RDMError
from ..images.pixels import decode_batch
from ..util.progress import enabled as progress_bars
from . import BuildOptions, Progress, _stack, embed_batch, embed_into_segments, read_batches

CPU_ACTOR_CORES = 8  # without GPUs: one embedding actor per this many cluster CPUs (at least one)
SHARDS_PER_ACTOR = 4  # at least this many shards per actor where the source allows, so decoding overlaps embedding


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RDMError('the ray engine needs Ray Data: pip install "rdm[ray]" (or "ray[data]>=2.9"), '
                       "or build with --engine local") from None
    return ray


# -- stages, as Ray runs them ----------------------------------------------------------------------
def shard_plan(n_items: int, start: int, shard_items: int, done: set[int]) -> list[dict]:
    """Shards {k, lo, hi} of source items [start, n_items) still to build, k by source position."""
    first = start // shard_items
    return [{"k": k, "lo": max(k * shard_items, start), "hi": min((k + 1) * shard_items, n_items)}
            for k in range(first, -(-n_items // shard_items)) if k not in done]


def shard_items_for(n_items: int, batch_size: int, batches_per_shard: int, actors: int) -> int:
    """Items per Ray shard: the local engine's segment (batches_per_shard batches), or the largest divisor of it
    that still gives every actor SHARDS_PER_ACTOR shards, so a small build is not one shard decoded, then embedded.
    A divisor keeps the local engine's segment boundaries: either engine resumes the other's build."""
    for d in sorted((d for d in range(1, batches_per_shard + 1) if batches_per_shard % d == 0), reverse=True):
        if -(-n_items // (batch_size * d)) >= SHARDS_PER_ACTOR * actors:
            return batch_size * d
    return batch_size


def read_decode(shards: dict, source, transform, options, batch_size: int) -> dict:
    """CPU task: read each shard's items in batches and decode them (bad items become skip records)."""
    out = []
    for k, lo, hi in zip(shards["k"], shards["lo"], shards["hi"]):
        decoded = []
        for batch in read_batches(source, int(lo), int(hi), batch_size):
            results = decode_batch([it.payload for it in batch], transform, options)
            decoded.append(([replace(it, payload=None) for it in batch], results))  # the bytes are done with
        out.append(pickle.dumps(decoded, protocol=5))
    return {"k": np.asarray(shards["k"]), "decoded": np.array(out, dtype=object)}


class EmbedWrite:
    """Actor: one model; embeds a decoded shard batch by batch and writes it as one segment."""

    def __init__(self, model_id: str, dtype: str, weights_sha256: str | None, db_dir: str, vector_dtype: str,
                 present_ref, threads: int):
        import ray
        import torch

        from ..embed.embedder import Embedder

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        self.embedder = Embedder.load(model_id, device=device, dtype=dtype)
        if weights_sha256 and self.embedder.identity.weights_sha256 != weights_sha256:
            raise RDMError(f"{model_id} loads other weights on {os.uname().nodename} than on the driver; "
                           "give every node the same model files")
        self.db_dir, self.vector_dtype = Path(db_dir), vector_dtype
        self.present = ray.get(present_ref[0]) if present_ref else set()

    def __call__(self, shard: dict) -> dict:
        vectors, rows, skipped = [], [], []
        for batch, results in pickle.loads(shard["decoded"]):
            v, r, s = embed_batch(self.embedder, batch, results, self.present)
            vectors += v
            rows += r
            skipped += s
        k = int(shard["k"])
        entry = write_segment(self.db_dir, 0, _stack(vectors, self.embedder.dim), rows_to_table(rows),
                              skipped_table(skipped), self.vector_dtype, label=f"k{k:09d}")
        return {"k": k, "entry": pickle.dumps(entry)}


def _per_row(cls):
    """Ray Data hands batches of rows; our stages take one shard (a row) at a time."""

    class PerRow(cls):
        def __call__(self, batch: dict) -> dict:
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            outs = [cls.__call__(self, row) for row in rows]
            return {key: np.array([o[key] for o in outs], dtype=object) for key in outs[0]}

    PerRow.__name__ = cls.__name__
    return PerRow


# -- the driver -------------------------------------------------------------------------------------
@dataclass
class RayEngine:
    """Runs read -> decode -> embed -> write on a Ray cluster; plugs into `rdm.build.build_database`."""

    address: str | None = None  # Ray cluster to join ("auto", "ray://HEAD:10001"); None: the current or a local one
    model_id: str | None = None  # what actors load (default: the driver's embedder id)
    dtype: str | None = None  # actors' dtype (default: the driver's, so vectors match)
    actors: int | None = None  # embedding actors (default: one per GPU, else one per CPU_ACTOR_CORES CPUs)

    def __call__(self, source, embedder, opts: BuildOptions, db_dir: Path, progress: Progress, present: set[str],
                 dtype: str) -> None:
        if source.kind == "embeddings":  # nothing to embed: the vectors are copied here, block by block
            return embed_into_segments(source, embedder, opts, db_dir, progress, present, dtype)
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False, configure_logging=True)
        try:
            self._run(ray, source, embedder, opts, db_dir, progress, present, dtype)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, source, embedder, opts, db_dir, progress, present, dtype) -> None:
        n = len(source) if opts.limit is None else min(len(source), opts.limit)
        if n < 0:
            raise RDMError("the ray engine needs a source of known length (not a streamed dataset); "
                           "use --engine local")
        state = progress.state
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = self.actors or (gpus if gpus else max(1, cpus // CPU_ACTOR_CORES))
        shard_items = shard_items_for(n, opts.batch_size, opts.batches_per_shard, actors)
        pending = state.setdefault("pending", {})
        if state.get("ray_shard_items", shard_items) != shard_items:  # shards of another cut: not this plan's
            pending.clear()
        state["ray_shard_items"] = shard_items
        for key, entry in list(pending.items()):  # a resumed build: keep what is still whole
            if not all((db_dir / e["name"]).is_file() for e in entry["files"].values()):
                del pending[key]
        todo = shard_plan(n, state["next_index"], shard_items, {int(k) for k in pending})
        self._promote(progress, shard_items, n)
        if todo:
            for k, entry in self._pipeline(ray, todo, source, embedder, opts, db_dir, present, dtype, gpus, cpus,
                                           actors, shard_items):
                pending[str(k)] = entry
                progress.save()
                self._promote(progress, shard_items, n)
        if state["next_index"] < n:
            raise RDMError(f"the ray build ended with shards missing (next item {state['next_index']} of {n}); "
                           "rerun with --resume")

    @staticmethod
    def _promote(progress: Progress, shard_items: int, n: int) -> None:
        """Move finished shards that continue the ordered prefix into the segments, with their rows."""
        state = progress.state
        pending = state["pending"]
        while (k := str(state["next_index"] // shard_items)) in pending and state["next_index"] < n:
            entry = dict(pending.pop(k), start=state["next_row"])
            state["segments"].append(entry)
            state["next_row"] += entry["rows"]
            state["next_index"] = min((int(k) + 1) * shard_items, n)
            state["embedded"] += entry["rows"]
            progress.save()
            fault(f"after-shard:{len(state['segments']) - 1}")

    def _pipeline(self, ray, todo, source, embedder, opts, db_dir, present, dtype, gpus, cpus, actors, shard_items):
        """Yield (k, segment entry) as the cluster finishes shards (in any order)."""
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress_bars(opts.progress)
        ctx.print_on_execution_start = False
        if not ctx.enable_progress_bars:  # logs, not a terminal: Ray Data's own summaries and hints stay out
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        actor_res = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        threads = max(1, min(cpus, CPU_ACTOR_CORES) if not gpus else 1)
        # CPU actors take the driver's dtype, so that their vectors are the local engine's; GPU actors pick theirs
        model_dtype = self.dtype or ("auto" if gpus else str(embedder.dtype).removeprefix("torch."))
        present_ref = [ray.put(set(present))] if present else None
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        # read + decode: CPU tasks asking for the memory of a decoded shard (remote arguments unlike the
        # actors', so Ray does not fuse them into the actors: tasks decode the next shards while actors embed)
        side = embedder.pixel_transform.size
        shard_bytes = 3 * shard_items * side * side * 3 + (256 << 20)  # + the process
        ds = ds.map_batches(read_decode, batch_size=1, num_cpus=1, memory=shard_bytes,
                            fn_kwargs={"source": source, "transform": embedder.pixel_transform,
                                       "options": opts.decode, "batch_size": opts.batch_size})
        ds = ds.map_batches(_per_row(EmbedWrite), batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_args=(self.model_id or embedder.identity.model, model_dtype,
                                                 embedder.identity.weights_sha256, str(db_dir.resolve()), dtype,
                                                 present_ref, threads),
                            **actor_res)
        try:
            for row in ds.iter_rows():
                yield int(row["k"]), pickle.loads(row["entry"])
        except Exception as e:  # noqa: BLE001 -- Ray wraps a stage's exception in its own types: show ours
            cause = _rdm_cause(e)
            if cause is not None:
                raise RDMError(str(cause)) from None
            raise RDMError(f"the ray build failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                           "finished segments are kept: rerun with --resume") from None


def _rdm_cause(e: BaseException) -> RDMError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RDMError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None

