"""The `rdm` command line: a thin click layer over the library (every command is a library call)."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace

import click

from .. import api
from ..demo import toyart
from ..errors import RDMError
from ..models import assets as registry
from ..util.progress import enabled as progress_bars
from .options import default_text, library_default, option

INDEXES_HELP = "home of the databases (default: $RDM_INDEXES or ./indexes)"


def indexes_option(f):
    return click.option("--indexes", "indexes", type=click.Path(file_okay=False), default=None,
                        help=INDEXES_HELP)(f)


def _home(ctx: click.Context, local: str | None) -> str | None:
    return local or (ctx.obj or {}).get("indexes")


class RDMGroup(click.Group):
    """Prints RDMError messages without a traceback and exits 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RDMError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=RDMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--indexes", type=click.Path(file_okay=False), default=None, help=INDEXES_HELP)
@click.version_option(package_name="rdm")
@click.pass_context
def main(ctx: click.Context, indexes: str | None) -> None:
    """rdm: retrieval-augmented, style-swappable image generation."""
    ctx.obj = {"indexes": indexes}


# -- databases -----------------------------------------------------------------------------------
@main.command("build-index")
@click.argument("source")
@click.option("--name", help="database name (default: the source folder's or file's name)")
@click.option("--clip", "clip", default=None, help="open_clip model: NAME:TAG, hf-hub:ORG/REPO or local-dir:PATH "
              "(default ViT-L-14:openai)")
@option("rdm.build:build_index.batch_size", "--batch-size", type=click.IntRange(1), help="images per encoder call")
@click.option("--workers", default=None, type=click.IntRange(0), help="decoding processes (0 = in-line)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
@option("rdm.build:build_index.dtype", "--dtype", help="auto, float32, bfloat16 or float16")
@click.option("--index-factory", default=None, help='FAISS factory string: "Flat" (exact) or an inverted file, e.g. '
              '"IVF1024,PQ96", "IVF4096,SQ8" (default: exact up to 200k vectors, else OPQ{D/8},IVF{~sqrt N},PQ{D/8}np '
              'tuned to recall@10 0.95)')
@click.option("--vector-dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="stored vectors (default: float16 above 1M vectors, else float32)")
@click.option("--resume", is_flag=True, help="continue an interrupted build (or start it; exits 0 when complete)")
@click.option("--append", is_flag=True, help="add the source's new items to an existing database")
@click.option("--overwrite", is_flag=True, help="rebuild an existing database")
@click.option("--limit", type=click.IntRange(1), default=None, help="embed at most N items")
@option("rdm.build:build_index.checkpoint_every", "--checkpoint-every", type=click.IntRange(1),
              help="batches between resumable checkpoints")
@option("rdm.build:build_index.split", "--split", help="dataset split (Hugging Face sources)")
@click.option("--image-column", default=None, help="image column (Hugging Face sources)")
@click.option("--caption-column", default=None, help="caption column (Hugging Face sources)")
@click.option("--streaming", is_flag=True, help="stream the dataset instead of downloading it whole")
@option("rdm.build:build_index.engine", "--engine", type=click.Choice(["local", "ray"]),
              help="local: this process and its decoding workers; ray: a Ray Data pipeline (pip install 'rdm[ray]')")
@click.option("--ray-address", default=None, help="Ray cluster to run on (e.g. auto, HEAD:6379); default: a local one")
@click.option("--licence-column", default=None, help="metadata column holding each item's licence (with "
              "--allow-licence: only those items condition generation; see rdm licence)")
@click.option("--allow-licence", "allow_licence", multiple=True, help="licences that may condition generation, "
              "e.g. cc0,cc-by (repeatable)")
@click.option("--attribution-column", default=None, help="metadata column holding the credit each item asks for")
@indexes_option
@click.pass_context
def build_index(ctx, source, name, clip, batch_size, workers, device, dtype, index_factory, vector_dtype, resume, append,
                overwrite, limit, checkpoint_every, split, image_column, caption_column, streaming, engine, ray_address,
                licence_column, allow_licence, attribution_column, indexes):
    """Embed SOURCE (a folder, a dataset or an embeddings file) into a named database."""
    if bool(licence_column) != bool(allow_licence):
        raise RDMError("a licence rule needs both --licence-column and --allow-licence")
    if attribution_column and not licence_column:
        raise RDMError("--attribution-column belongs to a licence rule: give --licence-column and --allow-licence")
    report = api.build_index(source, name=name, clip=clip, indexes=_home(ctx, indexes), batch_size=batch_size,
                             workers=workers, device=device, dtype=dtype, index_factory=index_factory,
                             vector_dtype=vector_dtype, resume=resume, append=append, overwrite=overwrite, limit=limit,
                             checkpoint_every=checkpoint_every, split=split,
                             image_column=image_column, caption_column=caption_column, streaming=streaming,
                             engine=engine, ray_address=ray_address)
    click.echo(api.format_report(report))
    if licence_column:
        rule = api.set_licence(report.path, licence_column, allow_licence, attribution_column)
        click.echo(_describe_rule(report.name, rule))


def _describe_rule(name, rule):
    if rule is None:
        return f"{name}: no licence rule (every item may condition generation)"
    credit = f"; credits from column {rule.attribution}" if rule.attribution else ""
    return f"{name}: only items whose {rule.column} is {', '.join(rule.allow)} condition generation{credit}"


def _curate_default(name):
    from ..curate import CurateOptions

    return getattr(CurateOptions(), name)


@main.command("curate")
@click.argument("db")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="write OUT/report.html (thumbnails, offline), OUT/flags.parquet and OUT/curate.json")
@click.option("--apply", "apply_kinds", default=None, help="remove what is flagged: duplicates, outliers or both "
              "(comma-separated), through the takedown path, recorded in the manifest's history")
@click.option("--dry-run", is_flag=True, help="with --apply: say what would be removed, remove nothing")
@click.option("--where", "where", multiple=True, help="COLUMN=VALUE: curate only these items")
@click.option("-k", "k", type=click.IntRange(1), default=None, help="neighbours per item [default: %d]" % _curate_default("k"))
@click.option("--dup-threshold", type=click.FloatRange(-1, 1), default=None,
              help="cosine of near-duplicates [default: %g]" % _curate_default("dup_threshold"))
@click.option("--outlier-threshold", type=float, default=None,
              help="outlier score (a robust z-score) threshold [default: %g]" % _curate_default("mad_factor"))
@click.option("--representatives", "n_representatives", type=click.IntRange(0), default=None,
              help="size of the style card [default: %d]" % _curate_default("n_representatives"))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--quiet", is_flag=True, help="no progress bar")
@indexes_option
@click.pass_context
def curate_cmd(ctx, db, out, apply_kinds, dry_run, where, k, dup_threshold, outlier_threshold, n_representatives,
               as_json, quiet, indexes):
    """Find DB's near-duplicates, outliers and representatives from its stored vectors; report, or --apply."""
    from ..curate import CurateOptions

    if dry_run and not apply_kinds:
        raise RDMError("--dry-run goes with --apply KINDS")
    given = {"k": k, "dup_threshold": dup_threshold, "outlier_threshold": outlier_threshold,
             "n_representatives": n_representatives}
    options = CurateOptions(where=tuple(where), **{key: v for key, v in given.items() if v is not None})
    report, removed, files = api.curate(db, options, apply_kinds.split(",") if apply_kinds else (), dry_run, out,
                                        _home(ctx, indexes), progress=progress_bars(not quiet))
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "removed": removed, "dry_run": dry_run}, indent=1))
        return
    dropped = sum(len(g["drop"]) for g in report.duplicate_groups)
    click.echo(f"{report.database}: {report.count} items; {len(report.duplicate_groups)} near-duplicate groups "
               f"({dropped} items beyond the first of each), {len(report.outliers)} outliers, "
               f"{len(report.representatives)} representatives")
    click.echo(f"  coherence: mean similarity to the {report.options['k']} nearest "
               f"{report.coherence['knn_similarity']}, to the centroid {report.coherence['centroid_similarity']}")
    click.echo(f"  outliers: {report.outlier_rule}")
    for o in report.outliers[:10]:
        click.echo(f"    {o['id']}  score {o['score']:.3f}  nearest {', '.join(o['nearest'])}")
    for name, path in files.items():
        click.echo(f"  {name}: {path}")
    if apply_kinds:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {len(removed)} item(s)" + ("" if removed else " (nothing flagged)"))
        for item, why in list(removed.items())[:20]:
            click.echo(f"  {item}: {why}")


@main.command("licence")
@click.argument("db")
@click.option("--column", default=None, help="metadata column holding each item's licence")
@click.option("--allow", "allow", multiple=True, help="licences that may condition generation, e.g. cc0,cc-by")
@click.option("--attribution-column", default=None, help="metadata column holding the credit each item asks for")
@click.option("--clear", is_flag=True, help="remove the rule: every item may condition generation")
@indexes_option
@click.pass_context
def licence_cmd(ctx, db, column, allow, attribution_column, clear, indexes):
    """Show or set which of DB's items may condition generation, by their licence (search still shows all)."""
    rule = api.set_licence(db, column, allow, attribution_column, clear, _home(ctx, indexes))
    click.echo(_describe_rule(db, rule))


@main.command("adapters")
@click.option("--json", "as_json", is_flag=True, help="print them as JSON")
def adapters_cmd(as_json):
    """List the LoRA adapters in $RDM_ADAPTERS (default $RDM_HOME/adapters) and those shipped with rdm: what each was
    trained on and for."""
    from ..models.adapters import adapters_home, list_adapters

    found = list_adapters()
    if as_json:
        click.echo(json.dumps([a if isinstance(a, dict) else a.to_dict() for a in found], indent=2))
        return
    if not found:
        click.echo(f"no adapters in {adapters_home()} (train one: rdm train --adapter NAME --data DIR --db DB --out RUN)")
        return
    for a in found:
        if isinstance(a, dict):
            click.echo(f"{a['name']}: unusable: {a['error']}")
        else:
            click.echo(f"{a.name}: rank {a.rank}, {a.targets}, {a.steps} steps on {a.database} "
                       f"({a.database_fingerprint[:8]}); base model {a.base_model} ({a.base_fingerprint[:12]}); "
                       f"{a.bytes / 2**20:.1f} MB")


@main.command("list")
@indexes_option
@click.pass_context
def list_cmd(ctx, indexes):
    """List the databases in the home."""
    rows = api.list_databases(_home(ctx, indexes))
    if not rows:
        click.echo(f"no databases in {api.home_path(_home(ctx, indexes))} (create one with rdm build-index)")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['count']:>9} items  dim {r['dim']:<5} {r['index_factory']:<14} {r['embedder']}")


@main.command()
@click.argument("db")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@indexes_option
@click.pass_context
def info(ctx, db, as_json, indexes):
    """Describe database DB (a name or a database folder) from its manifest."""
    data = api.info(db, _home(ctx, indexes), skipped=as_json)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(api.format_info(data))


@main.command()
@click.option("--db", "db", required=True, help="database name or folder")
@click.argument("text", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(), help="query by image (repeatable)")
@option("rdm.api:search.k", "-k", "k", type=click.IntRange(1), help="neighbours per query")
@click.option("--where", "where", multiple=True, help="COLUMN=VALUE filter applied inside the search (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one list of hits per query, in order")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None, help="write a contact sheet PNG")
@click.option("--device", default=None)
@indexes_option
@click.pass_context
def search(ctx, db, text, images, k, where, as_json, sheet, device, indexes):
    """Find the k nearest items of each TEXT and --image query."""
    labels, hits = api.search(db, list(text), list(images), k=k, where=list(where), indexes=_home(ctx, indexes),
                              device=device)
    if as_json:
        click.echo(json.dumps(hits, indent=2, default=str))
    else:
        for label, qh in zip(labels, hits):
            click.echo(f"# {label}")
            for rank, h in enumerate(qh, 1):
                click.echo(f"{rank:>3}. {h['score']:.4f}  {h['id']}" + (f"  — {h['caption']}" if h.get("caption") else ""))
    if sheet:
        out = api.write_search_sheet(labels, hits, sheet, title=f"rdm search --db {db}")
        click.echo(f"contact sheet: {out}", err=as_json)


@main.command()
@click.option("--db", "db", required=True, help="database name or folder")
@click.argument("ids", nargs=-1)
@click.option("--where", "where", multiple=True, help="COLUMN=VALUE: remove every matching item")
@indexes_option
@click.pass_context
def remove(ctx, db, ids, where, indexes):
    """Remove items by id or metadata filter (takedowns), without re-embedding."""
    removed, left = api.remove(db, list(ids), list(where), _home(ctx, indexes))
    click.echo(f"removed {len(removed)} item(s) from {db}; {left} left (rdm compact {db} reclaims their space)")


@main.command()
@click.argument("db")
@click.option("--quiet", is_flag=True, help="no progress bar")
@indexes_option
@click.pass_context
def compact(ctx, db, quiet, indexes):
    """Merge DB's segments and drop removed items, atomically (a killed compaction resumes when rerun)."""
    r = api.compact(db, _home(ctx, indexes), progress=not quiet)
    click.echo(f"compacted {r['name']}: {r['segments_before']} -> {r['segments_after']} segment(s), "
               f"{r['removed_rows_dropped']} removed row(s) dropped, {r['count']} items, {r['seconds']:.1f} s"
               + (f" (resumed after {r['resumed_segments']} finished segment(s))" if r["resumed_segments"] else ""))


@main.command()
@click.argument("db")
@indexes_option
@click.pass_context
def verify(ctx, db, indexes):
    """Check the size and digest of every file of DB (exits 1 on the first that differs)."""
    r = api.verify(db, _home(ctx, indexes))
    click.echo(f"{r['name']}: {r['files']} files, {r['bytes']} bytes, {r['segments']} segment(s), {r['count']} items: ok")


MODELS_OWN = "[default: the model's]"


def adapter_option():
    return click.option("--adapter", "adapters", multiple=True,
                        help="LoRA adapter NAME[:WEIGHT] (rdm adapters; a name or a folder), repeatable: mixed by "
                        "weight; weight 0 is the base model")


def sampler_options(f=None):
    """The sampler settings of rdm sample / compare / demo / score. None everywhere: the model's own settings
    (rdm.models.format.SamplingDefaults, recorded in its rdm_config.json) apply; no default is written here."""
    options = [
        click.option("--steps", type=click.IntRange(1), default=None, help=f"denoising steps {MODELS_OWN}"),
        click.option("--guidance", type=float, default=None, help=f"classifier-free guidance scale {MODELS_OWN}"),
        click.option("--guidance-rescale", type=click.FloatRange(0, 1), default=None,
                     help="rescaled classifier-free guidance (Lin et al. 2024, 3.4; diffusers' guidance_rescale): 0 "
                     f"off, 0.7 their suggestion {MODELS_OWN}"),
        click.option("--style-scale", type=float, default=None,
                     help="style strength: the neighbours' own guidance scale (two-condition guidance; --guidance then "
                     "weighs the prompt alone). 0 ignores the neighbours, = --guidance is plain guidance "
                     f"{MODELS_OWN}"),
        click.option("--scheduler", default=None, help=f"ddim, ddim-trailing, dpm++, euler, ... or a diffusers "
                     f"scheduler class {MODELS_OWN}"),
        click.option("--eta", type=click.FloatRange(0, 1), default=None,
                     help=f"DDIM eta: 0 deterministic (CompVis' default), 1 ancestral (DDPM-like) {MODELS_OWN}"),
    ]
    if f is None:
        return options
    for decorate in reversed(options):
        f = decorate(f)
    return f


def neighbour_options(f=None):
    """Control over the neighbours (rdm.sampling.conditioning.NeighbourControl); defaults as rdm.sampling.generate.SampleOptions."""
    options = [
        click.option("--diversity", type=click.FloatRange(0, 1), default=None,
                     help="maximal marginal relevance over over-fetched candidates: 0 the nearest k, 1 the most novel "
                     + default_text("rdm.sampling.options:SampleOptions.diversity")),
        click.option("--dedup", type=click.FloatRange(-1, 1), default=None,
                     help="cosine above which two candidates are duplicates, only one kept [default: 0.95 with "
                     "--diversity, else off]"),
        click.option("--max-per", "max_per", multiple=True, help="COLUMN=N: at most N neighbours sharing a value of "
                     "COLUMN (an artist, a source ...; repeatable)"),
        click.option("--neighbour-weights", type=click.Choice(["uniform", "database", "score"]), default=None,
                     help="each neighbour's weight in cross-attention: uniform, database (its --db weight), score (its "
                     "similarity over the best one's) " + default_text("rdm.sampling.options:SampleOptions.neighbour_weights") +
                     "; --ref IMG:W weighs a reference"),
        click.option("--negative-db", "negative_dbs", multiple=True, help="database whose neighbours the sample is "
                     "guided away from (repeatable, NAME:WEIGHT)"),
        click.option("--negative-ref", "negative_refs", multiple=True, help="image the sample is guided away from "
                     "(repeatable)"),
        click.option("--negative-prompt", default=None, help="text the sample is guided away from"),
        click.option("--content-subtract", type=click.FloatRange(0, 2), default=None,
                     help="each neighbour minus this times the query's embedding, renormalised: keeps the retrieved "
                     "images' content out of the style (InstantStyle; 0 off) " +
                     default_text("rdm.sampling.options:SampleOptions.content_subtract")),
        click.option("--neighbour-window", default=None, help="START:END, the fractions of the denoising steps in "
                     "which the neighbours act (e.g. 0:0.6) [default: 0:1, all]"),
    ]
    if f is None:
        return options
    for decorate in reversed(options):
        f = decorate(f)
    return f


@main.command()
@click.argument("images", nargs=-1)
@click.option("--db", "dbs", multiple=True, required=True, help="a database the images may look like (repeatable)")
@click.option("--target", default=None, help="the --db the images should look like: its retrieval precision and "
              "probe accuracy are reported")
@click.option("--prompt", "prompts", multiple=True, help="the content the images should show (CLIP text-image "
              "similarity); with --model, the prompts to sample (repeatable)")
@option("rdm.sampling.options:ScoreOptions.k", "-k", "k", type=click.IntRange(1),
        help="nearest neighbours per image over all the databases")
@option("rdm.sampling.options:ScoreOptions.seed", "--seed", type=int, help="seed of the linear probe's training split")
@click.option("--model", default=None, help="instead of IMAGES: sample each --prompt with each --db with this model "
              "and score the style swap (each sample towards the database it was drawn from)")
@option("rdm.sampling.options:SWAP_SEEDS", "--seeds", "sample_seeds", to_cli=lambda seeds: ",".join(map(str, seeds)),
              help="with --model: comma-separated sampling seeds, the same for every database")
@click.option("--grid", is_flag=True, help="with --model: over the sampler grid (the model's defaults, DDIM 8/25/50 and "
              "DPM-Solver++ 10/20/50 steps at guidance 3 and 5) instead of one setting")
@sampler_options
@neighbour_options
@click.option("--neighbours", "neighbours_k", type=click.IntRange(0), default=None,
              help="with --model: neighbours per sample [default: the model's k]")
@adapter_option()
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--device", default=None, help="the CLIP's device (default: cuda when present)")
@indexes_option
@click.pass_context
def score(ctx, images, dbs, target, prompts, k, seed, model, sample_seeds, grid, steps, guidance, guidance_rescale,
          style_scale, scheduler, eta, neighbours_k, adapters, as_json, device, indexes, max_per, negative_dbs,
          negative_refs, **control_options):
    """Style adherence of IMAGES (files or folders) to each --db: neighbours, a linear probe, prompt similarity; or,
    with --model, the model's style swap over the --db databases."""
    from ..sampling.score import ScoreOptions
    from ..sampling.score import score as run_score

    options = ScoreOptions(k=k, target=target, seed=seed, device=device)
    sampling = {"steps": steps, "guidance": guidance, "guidance_rescale": guidance_rescale, "style_scale": style_scale,
                "scheduler": scheduler, "eta": eta}
    if model is None:
        if not images:
            raise click.UsageError("give IMAGES to score, or --model MODEL to sample and score its style swap")
        if grid or any(v is not None for v in [*sampling.values(), *control_options.values(), neighbours_k]) \
                or max_per or negative_dbs or negative_refs or adapters:
            raise click.UsageError("--grid, sampler settings, neighbour control and adapters apply with --model only")
        if len(prompts) > 1:
            raise click.UsageError("give one --prompt for IMAGES (several are for --model)")
        report = run_score(list(images), list(dbs), replace(options, prompt=prompts[0] if prompts else None),
                           indexes=_home(ctx, indexes))
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
        return
    from ..sampling.score import SAMPLER_GRID, SwapSettings, style_swap

    if images:
        raise click.UsageError("give IMAGES or --model, not both")
    if not prompts:
        raise click.UsageError("--model needs at least one --prompt to sample")
    try:
        seeds = [int(s) for s in sample_seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"not comma-separated integers: {sample_seeds!r}", param_hint="--seeds") from None
    if grid and any(v is not None for v in sampling.values()):
        raise click.UsageError("--grid sets the sampler; leave out --steps, --guidance ... (or leave out --grid)")
    cells = ([SwapSettings.from_dict(c) for c in SAMPLER_GRID] if grid
             else [SwapSettings(label="as given" if any(v is not None for v in sampling.values())
                                else "model's defaults", **sampling)])
    from ..sampling.generate import load_pipeline, use_adapters

    pipe = load_pipeline(model, device, None, False)
    used = use_adapters(pipe, adapters)
    home = _home(ctx, indexes)
    opened = [api.open_database(name, home) for name in dbs]
    from ..sampling.generate import neighbour_control

    control = neighbour_control(_sample_options(True, (), max_per, negative_dbs, negative_refs, **control_options))
    rows = style_swap(pipe, opened, list(prompts), seeds, cells, options, log=None if as_json else click.echo,
                      control=control, k=neighbours_k)
    if as_json:
        click.echo(json.dumps({"format": "rdm-style-swap", "model": str(model), "adapters": used,
                               "databases": [d.name for d in opened],
                               "prompts": list(prompts), "seeds": seeds, "cells": rows}, indent=2))


@main.command()
@option("rdm.service.config:ServeConfig.host", "--host", help="address to bind (non-loopback needs --allow-network)")
@option("rdm.service.config:ServeConfig.port", "--port", type=click.IntRange(0, 65535), help="TCP port (0: any free one)")
@click.option("--model", default=None, help="rdm model folder (default: $RDM_MODEL)")
@click.option("--db", "dbs", multiple=True, help="serve only this database (name or folder; repeatable; default: all in "
              "--indexes)")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False, exists=True), default=None, envvar="RDM_SERVE_KEYS",
              help="API keys file (rdm keys add): who may use which collection [default: $RDM_SERVE_KEYS; neither: "
              "a key for this run, printed in the page's link]")
@click.option("--anonymous", multiple=True, help="collection callers without a key may search and generate on "
              "(repeatable; '*': all); ClipClient sends no key")
@option("rdm.service.config:ServeConfig.max_jobs_per_key", "--max-jobs-per-key", type=click.IntRange(1),
        help="jobs one key may have waiting or running")
@option("rdm.service.config:ServeConfig.fair_queue", "--fair-queue/--fifo", help="serve the keys with jobs waiting "
        "in turn, or first come, first served")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="file holding a takedown token (a key with the remove scope on every collection)")
@click.option("--allow-network", is_flag=True, help="answer generation and search from other machines too")
@click.option("--allow-urls", is_flag=True, help="fetch image_url queries (never from local or private addresses)")
@option("rdm.service.config:ServeConfig.max_queue", "--max-queue", type=click.IntRange(1), help="jobs waiting or running")
@option("rdm.service.config:ServeConfig.max_batch", "--max-batch", type=click.IntRange(1), help="images per pipeline call")
@click.option("--device", default=None, help="cpu, cuda ... (default: cuda when present)")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads for sampling (default: torch's)")
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="PEM key to sign every served PNG's content credentials (C2PA) [default: $RDM_SIGN_KEY; neither: "
              "rdm's local identity, which no one trusts]")
@click.option("--sign-cert", type=click.Path(dir_okay=False, exists=True), default=None,
              help="PEM certificate chain of --sign-key, leaf first [default: $RDM_SIGN_CERT]")
@click.option("--adapter", "adapters", multiple=True,
              help="LoRA adapter (name in `rdm adapters`, or folder) requests may use; repeatable; loaded once")
@click.option("--audit-log", type=click.Path(dir_okay=False), default=None,
              help="append a JSON line for every takedown and every refused request (401/403/413/429) to this file")
@indexes_option
@click.pass_context
def serve(ctx, host, port, model, dbs, keys_file, anonymous, max_jobs_per_key, fair_queue, token_file, allow_network, allow_urls, max_queue, max_batch, device, threads,
          sign_key, sign_cert, adapters, audit_log, indexes):
    """Serve the API, clip-retrieval's /knn-service and the web page from one loaded model."""
    from pathlib import Path

    from ..service.config import ServeConfig
    from ..service.server import serve as run_server

    token = None
    if token_file:
        token = Path(token_file).read_text().strip()
        if len(token) < 16:
            raise RDMError(f"the token in {token_file} is {len(token)} characters; use at least 16 "
                           "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    config = ServeConfig(host=host, port=port, model=model, indexes=_home(ctx, indexes), databases=tuple(dbs) or None,
                         token=token, allow_network=allow_network, allow_urls=allow_urls, max_queue=max_queue,
                         max_batch=max_batch, device=device, torch_threads=threads, sign_key=sign_key,
                         sign_cert=sign_cert, adapters=tuple(adapters), audit_log=audit_log, keys=keys_file,
                         anonymous=tuple(anonymous), max_jobs_per_key=max_jobs_per_key,
                         fair_queue=fair_queue)
    run_server(config)


@main.group()
def keys():
    """API keys of rdm serve: each with scopes and the collections it may use; stored as SHA-256 only."""


def _keys_file(path: str | None) -> str:
    import os

    path = path or os.environ.get("RDM_SERVE_KEYS")
    if not path:
        raise RDMError("name the keys file: --keys FILE (or set $RDM_SERVE_KEYS)")
    return path


@keys.command("add")
@click.argument("name")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False), default=None,
              help="keys file (created if missing) [default: $RDM_SERVE_KEYS]")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["search", "generate", "upload", "remove", "admin"]),
              help="what the key may do (repeatable) [default: search, generate, upload]")
@click.option("--collection", "collections", multiple=True,
              help="a collection the key may use (repeatable; '*': every one served) [default: *]")
@click.option("--max-jobs", type=click.IntRange(1), default=None, help="its jobs waiting or running at once "
              "[default: the server's --max-jobs-per-key]")
def keys_add(name, keys_file, scopes, collections, max_jobs):
    """Make a key NAME; print it once (only its SHA-256 is stored)."""
    from ..service.access import ANONYMOUS_SCOPES, add_key

    path = _keys_file(keys_file)
    token = add_key(path, name, tuple(scopes) or ANONYMOUS_SCOPES, tuple(collections) or ("*",), max_jobs)
    click.echo(token)
    click.echo(f"key {name!r} added to {path}; give it to its user now: it cannot be shown again", err=True)


@keys.command("list")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False), default=None, help="keys file "
              "[default: $RDM_SERVE_KEYS]")
def keys_list(keys_file):
    """The keys of a keys file: name, scopes, collections (never the keys themselves)."""
    from ..service.access import read_keys

    for k in read_keys(_keys_file(keys_file)):
        jobs = f"  max_jobs={k.max_jobs}" if k.max_jobs else ""
        click.echo(f"{k.name}  scopes={','.join(k.scopes)}  collections={','.join(k.collections)}{jobs}")


@keys.command("remove")
@click.argument("name")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False), default=None, help="keys file "
              "[default: $RDM_SERVE_KEYS]")
def keys_remove(name, keys_file):
    """Revoke key NAME (a running server re-reads its keys file: refused from its next request)."""
    from ..service.access import remove_key

    remove_key(_keys_file(keys_file), name)
    click.echo(f"key {name!r} removed")


@main.command("toyart")
@click.argument("out", type=click.Path(file_okay=False))
@option("rdm.demo.toyart:DEFAULT_COUNT", "-n", "count", type=click.IntRange(1), help="images to draw")
@click.option("--styles", default=None, help="comma-separated subset of: " + ", ".join(toyart.STYLES) +
              " [default: all of those]; " + ", ".join(toyart.NEW_STYLES) + ": styles the demo model never saw")
@option("rdm.demo.toyart:ToyArtSpec.size", "--size", type=click.IntRange(16, 1024), help="image side in pixels")
@option("rdm.demo.toyart:ToyArtSpec.seed", "--seed", type=int, help="item i draws from the seed and i")
@option("rdm.demo.toyart:generate.start", "--start", type=click.IntRange(0), help="index of the first item")
@option("rdm.demo.toyart:ToyArtSpec.style_caption_prob", "--style-caption-prob", type=click.FloatRange(0, 1),
              help="share of captions that name the style")
def toyart_cmd(out, count, styles, size, seed, start, style_caption_prob):
    """Draw a captioned toy-art image set (shapes x colours x styles) into OUT, with metadata.jsonl."""
    chosen = tuple(s.strip() for s in styles.split(",")) if styles else None
    spec = toyart.ToyArtSpec(size=size, seed=seed, style_caption_prob=style_caption_prob)
    path = toyart.generate(spec, count, out, styles=chosen, start=start)
    click.echo(f"{count} images in {path} (metadata.jsonl holds captions and labels)")


@main.command("demo")
@option("rdm.demo.config:DemoConfig.out", "--out", type=click.Path(file_okay=False),
              help="folder for the toy art, the databases (OUT/indexes), the grid PNG and its provenance JSON")
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False),
              help="rdm model folder [default: the bundled demo model, rdm/assets/demo/rdm]")
@click.option("--clip", default=None, help="the model's CLIP: a folder or an id [default: the bundled demo CLIP, "
              "or the one --model records]")
@click.option("--prompt", "--prompts", "prompts", multiple=True,
              help="content-only prompt (repeatable) [default: 'a red star', 'a blue circle', 'a green heart', "
              "'a yellow square']")
@option("rdm.demo.config:DemoConfig.seeds", "--seeds", type=click.IntRange(1), help="images per prompt")
@option("rdm.demo.config:DemoConfig.seed", "--seed", type=int, help="first seed")
@sampler_options
@click.option("-k", "k", default=None, type=click.IntRange(1), help="neighbours per query [default: the model's]")
@option("rdm.demo.config:DemoConfig.n_per_style", "--n-per-style", type=click.IntRange(1),
              help="toy-art images in each style's database")
@click.option("--styles", default=None, help="comma-separated subset of: " + ", ".join(toyart.STYLES) +
              " [default: all of those]; " + ", ".join(toyart.NEW_STYLES) + " (never seen by the demo model)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads [default: the idle cores, at most 4]; the demo's small batches gain little from "
              "more, and a busy CPU makes more much slower")
@adapter_option()
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out, model, clip, prompts, seeds, seed, steps, guidance, guidance_rescale, style_scale, scheduler, eta, k,
         n_per_style, styles, device, threads, adapters, quiet):
    """Swap the style by swapping the database: one grid of the same prompts and seeds, a row per toy-art style."""
    from ..demo.run import DemoConfig, run_demo

    chosen = {"styles": tuple(s.strip() for s in styles.split(","))} if styles else {}
    chosen.update({"prompts": tuple(prompts)} if prompts else {})
    run_demo(DemoConfig(out=out, model=model, clip=clip, seeds=seeds, seed=seed, steps=steps, guidance=guidance,
                        guidance_rescale=guidance_rescale, scheduler=scheduler, style_scale=style_scale, eta=eta, k=k, n_per_style=n_per_style, device=device, threads=threads,
                        progress=not quiet, adapters=tuple(adapters), **chosen),
             log=click.echo)


# -- sampling ------------------------------------------------------------------------------------
# rdm.sampling.generate imports diffusers (seconds); it is imported by the commands that sample, so that
# `rdm list` and friends stay quick.
MODEL_HELP = "rdm model folder (default: $RDM_MODEL)"
DB_HELP = "database NAME or NAME:WEIGHT (repeatable: neighbours are drawn in proportion); none: the query alone"


def sampling_options(f):
    """Options shared by `rdm sample` and `rdm compare`."""
    options = [
        click.option("--model", default=None, help=MODEL_HELP),
        click.option("-k", "k", type=click.IntRange(0), default=None,
                     help="neighbours per query (default: the model's)"),
        option("rdm.sampling.options:SampleOptions.num_images", "-n", "num_images", type=click.IntRange(1),
                     help="images per prompt (seeds SEED, SEED+1, ...)"),
        *sampler_options(),
        option("rdm.sampling.options:SampleOptions.seed", "--seed", type=click.IntRange(0),
                     help="seed of the first image (deterministic by default)"),
        click.option("--where", "where", multiple=True, help="COLUMN=VALUE filter applied inside the search"),
        *neighbour_options(),
        adapter_option(),
        click.option("--init-image", type=click.Path(dir_okay=False), default=None,
                     help="restyle or edit this image (image-to-image); without PROMPT its CLIP embedding is the query"),
        click.option("--strength", type=click.FloatRange(0, 1), default=None,
                     help="how much of --init-image is redrawn: 0 returns it, 1 ignores it; steps x strength steps run "
                     "[default: 0.8; 1 when outpainting]"),
        click.option("--mask", type=click.Path(dir_okay=False), default=None,
                     help="inpainting: white (or opaque) = redraw, the rest of --init-image is kept exactly"),
        click.option("--mask-feather", type=click.FloatRange(0), default=None,
                     help="a soft mask edge of about this many pixels, inside the mask " +
                     default_text("rdm.sampling.options:SampleOptions.mask_feather")),
        click.option("--extend", default=None, help="outpainting: LEFT,TOP,RIGHT,BOTTOM pixels added around "
                     "--init-image (one number: all sides)"),
        click.option("--aspect", default=None, help="outpainting: grow --init-image to this W:H (e.g. 16:9)"),
        click.option("--height", type=click.IntRange(1), default=None, help="pixels (default: the model's size)"),
        click.option("--width", type=click.IntRange(1), default=None, help="pixels (default: the model's size)"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)"),
        click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 "
                     "on CPU)"),
        click.option("--sign-key", type=click.Path(dir_okay=False), default=None,
                     help="PEM private key to sign each PNG's content credentials (C2PA) with [default: "
                     "$RDM_SIGN_KEY; neither: rdm's local identity, which no one trusts]"),
        click.option("--sign-cert", type=click.Path(dir_okay=False), default=None,
                     help="PEM certificate chain of --sign-key, leaf first [default: $RDM_SIGN_CERT]"),
        click.option("--copy-threshold", type=click.FloatRange(-1, 1), default=None,
                     help="CLIP cosine to the nearest neighbour or collection item at which an output is flagged a "
                     "near-copy (calibrated on the demo) " + default_text("rdm.sampling.options:SampleOptions.copy_threshold")),
        click.option("--no-copies", is_flag=True, default=None, help="refuse (do not write) outputs the copy guard "
                     "flags, and exit 1"),
        click.option("--no-copy-guard", "copy_guard", flag_value=False, default=None,
                     help="skip the copy guard (nothing compared or recorded)"),
        click.option("--no-credentials", "credentials", flag_value=False, default=None,
                     help="no C2PA manifest in the PNGs (the JSON provenance is still written)"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]
    for decorate in reversed(options):
        f = decorate(f)
    return f


def _retrieval_warnings(run):
    """Call run(); print its retrieval warnings (k clamped, filters matching few items) once each, plainly."""
    from ..sampling.conditioning import RetrievalWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RetrievalWarning)
        result = run()
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RetrievalWarning)):
        click.echo(f"warning: {message}", err=True)
    return result


def _credentials_note(options):
    """Say how the PNGs' content credentials were signed."""
    import os

    if not options.credentials:
        click.echo("content credentials: none (--no-credentials)")
    elif options.sign_key or os.environ.get("RDM_SIGN_KEY"):
        click.echo("content credentials: C2PA manifest embedded, signed with your key (rdm verify-image IMG)")
    else:
        click.echo("content credentials: C2PA manifest embedded, signed with rdm's local identity, which no one "
                   "else trusts (give --sign-key and --sign-cert to sign as you); rdm verify-image IMG")


def _sample_options(quiet, where, max_per, negative_dbs, negative_refs, **given):
    """SampleOptions from the command's options; those left unset keep SampleOptions' own defaults."""
    from ..sampling.generate import SampleOptions

    chosen = {name: value for name, value in given.items() if value is not None}
    return SampleOptions(where=tuple(where), max_per=tuple(max_per), negative_dbs=tuple(negative_dbs),
                         negative_refs=tuple(negative_refs), progress=not quiet, **chosen)


@main.command()
@click.argument("prompt", required=False)
@click.option("--db", "dbs", multiple=True, help=DB_HELP)
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="query by image instead of a prompt")
@click.option("--ref", "refs", multiple=True,
              help="reference image used directly as a neighbour, IMG or IMG:WEIGHT (repeatable; no database)")
@option("rdm.sampling.options:OUTPUTS", "--out", type=click.Path(file_okay=False),
              help="folder for the PNGs, their provenance JSON and the grid")
@sampling_options
@indexes_option
@click.pass_context
def sample(ctx, prompt, dbs, image, refs, out, model, device, dtype, indexes, **options):
    """Generate images for PROMPT, conditioned on its neighbours in the --db databases."""
    from ..sampling import generate

    options = _sample_options(**options)
    result = _retrieval_warnings(lambda: generate.sample(
        prompt, model=model, databases=list(dbs), options=options, image=image, refs=list(refs), out=out,
        indexes=_home(ctx, indexes), device=device, dtype=dtype))
    for png, record in zip(result.images, result.records):
        click.echo(f"{png}  (seed {record['seed']}, {len(record['neighbours'])} neighbours)")
    click.echo(f"grid: {result.grid}")
    for line in result.near_copies:
        click.echo(f"warning: copy guard: {line}", err=True)
    _credentials_note(options)


@main.command()
@click.argument("prompt", required=False)
@click.option("--db", "dbs", multiple=True, required=True, help="a database per grid row (repeatable); none: a row "
              "without retrieval")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="grid PNG (default: outputs/compare-PROMPT-SEED.png); the provenance JSON goes beside it")
@sampling_options
@indexes_option
@click.pass_context
def compare(ctx, prompt, dbs, out, model, device, dtype, indexes, **options):
    """Sample PROMPT (or restyle --init-image) with the same seeds and model once per --db, in one labelled grid."""
    from ..sampling import generate

    options = _sample_options(**options)
    grid_path, provenance = _retrieval_warnings(lambda: generate.compare(
        prompt, list(dbs), model=model, options=options, out=out, indexes=_home(ctx, indexes), device=device,
        dtype=dtype))
    click.echo(f"grid: {grid_path}\nprovenance: {provenance}")
    _credentials_note(options)


@main.command("verify-image")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--trust", "trust", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate(s) to trust as signers' anchors (your organisation's CA)")
@click.option("--json", "as_json", is_flag=True, help="print the manifest's findings as JSON")
def verify_image(image, trust, as_json):
    """Read and validate IMAGE's content credentials (C2PA): signature, image unchanged, ingredients."""
    import json as _json
    from pathlib import Path

    from ..sampling import credentials

    found = credentials.read(image, Path(trust).read_bytes() if trust else None)
    if as_json:
        click.echo(_json.dumps({"state": found.state, "status": found.status, "signer": found.signer,
                                "ingredients": found.ingredients, "generation": found.generation}, indent=2))
    else:
        signer = found.signer or {}
        who = ", ".join(str(signer[k]) for k in ("common_name", "issuer") if signer.get(k)) or "unknown signer"
        verdict = {"Trusted": "valid, signed by a trusted identity", "Valid": "valid (signature and image intact), "
                   "but the signer is not trusted here"}.get(found.state, "INVALID")
        click.echo(f"{image}: {verdict}; signed by {who}")
        for code in found.status:
            click.echo(f"  status: {code}")
        query = found.generation.get("query") or {}
        click.echo(f"  made by rdm from {_json.dumps(query)}, seed {found.generation.get('seed')}, "
                   f"{len(found.ingredients)} neighbour(s) as ingredients:")
        for item in found.ingredients:
            extra = ", ".join(f"{k} {item[k]}" for k in ("score", "weight", "licence", "attribution") if k in item)
            click.echo(f"    {item.get('collection')}/{item.get('id')}" + (f"  ({extra})" if extra else ""))
    if not found.unchanged:
        raise SystemExit(1)


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the checkpoint's CompVis config.yaml")
@option("rdm.embed.identity:DEFAULT_CLIP", "--clip", "clip",
              help="the CLIP the model was trained with (its identity is recorded in the model)")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="model folder to write")
@click.option("--no-ema", "no_ema", is_flag=True, help="use the raw U-Net weights instead of the EMA copies")
@option("rdm.sampling.generate:convert.k", "-k", "k", type=click.IntRange(0), help="default neighbours per query")
def convert(ckpt, config, clip, out, no_ema, k):
    """Convert a CompVis RDM checkpoint (CKPT + config.yaml) into an rdm model folder (nothing in it is executed)."""
    from ..sampling import generate

    result = generate.convert(ckpt, config, clip, out, ema=not no_ema, k=k)
    if result.note:
        click.echo(result.note, err=True)
    click.echo(f"model folder: {result.path}  (embedder {result.embedder['model']}, dim {result.embedder['dim']})")


@main.command(epilog="\b\nAssets:\n" + "\n".join(f"  {a.name:<15} {a.size:>7}  {a.about}"
                                                  for a in registry.ASSETS.values()))
@click.argument("name", type=click.Choice(list(registry.ASSETS)))
@click.option("--url", default=None, help="a mirror's URL of the file, or the path of a copy downloaded elsewhere "
              "[default: $RDM_PULL_URL_<NAME>, else $RDM_PULL_MIRROR/<file>, else the publisher's URL]")
@click.option("--config", default=None, help="the model's CompVis config.yaml (a path or URL), when the mirror holds "
              "another model [default: the published one]")
@click.option("--sha256", default=None, help="the file's expected sha256 (replaces the digest recorded at the first "
              "download)")
@click.option("--clip", default=None, help="the CLIP the vectors or the model were made with [default: the asset's, "
              "ViT-L-14:openai]")
@click.option("--force", is_flag=True, help="download and install again what is installed")
@click.option("--keep", is_flag=True, help="keep the downloaded file in $RDM_HOME/downloads")
@click.option("--quiet", is_flag=True, help="no progress bar")
@indexes_option
@click.pass_context
def pull(ctx, name, url, config, sha256, clip, force, keep, quiet, indexes):
    """Download a published model or database set (resumable, verified) and install it."""
    from ..pull import pull as run_pull

    result = run_pull(name, url=url, config=config, sha256=sha256, clip=clip, force=force, keep=keep,
                      indexes=_home(ctx, indexes), progress=False if quiet else None, log=click.echo)
    if result.kind == "databases" and result.installed:
        click.echo(f"sample with: rdm sample --db {result.installed[0].name} \"a lighthouse at dusk\"")


# -- training ------------------------------------------------------------------------------------
# rdm.train imports accelerate and diffusers (seconds): imported by the commands that train.
PRESET_HELP = "model size: tiny (tests), small (the 64x64 demo, pixel space), small-latent or base (GPU)"


def _preset(preset: str | None, config: str | None, default_from: str) -> str:
    if preset and config:
        raise click.UsageError("give --preset or --config, not both")
    return config or preset or library_default(default_from)


@main.command()
@click.option("--data", required=True, help="training images: a folder, hf:ORG/NAME or a local dataset")
@click.option("--db", "db", required=True, help="retrieval database (name or folder) the neighbours come from")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="run folder: model/ (the trained model), checkpoints/, samples/, metrics.jsonl")
@click.option("--preset", default=None, help=PRESET_HELP + " " + default_text("rdm.train.config:TrainConfig.preset"))
@click.option("--config", "config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a preset JSON file instead of --preset (see rdm/train/configs/)")
@click.option("--init", "init", default=None, type=click.Path(exists=True, file_okay=False),
              help="fine-tune this rdm model folder (its architecture, autoencoder and latent scale are kept)")
@click.option("--vae", default=None, help="AutoencoderKL folder (rdm train-vae), or none for pixel space "
              "[default: the preset's]")
@click.option("--clip", default=None, help="must be the database's CLIP (checked) [default: the database's]")
@click.option("--resolution", type=click.IntRange(1), default=None, help="image side in pixels")
@click.option("-k", "k", type=click.IntRange(1), default=None, help="neighbours per training image")
@click.option("--query", type=click.Choice(["image", "text", "mixed"]), default=None,
              help="query token of each training image: its own CLIP embedding, its caption's text embedding (what "
              "prompts give at inference, so the style must come from the neighbours), or either at random "
              "[default: the preset's, else image]")
@click.option("--steps", type=click.IntRange(1), default=None, help="total optimizer steps")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="images per process per micro-batch")
@option("rdm.train.config:TrainConfig.grad_accum", "--grad-accum", type=click.IntRange(1),
              help="micro-batches per optimizer step")
@click.option("--lr", type=float, default=None, help="AdamW learning rate")
@option("rdm.train.config:TrainConfig.lr_schedule", "--lr-schedule", type=click.Choice(["constant", "cosine"]),
        help="after the warm-up: constant, or cosine to zero at --steps")
@click.option("--warmup-steps", type=click.IntRange(0), default=None, help="linear learning-rate warm-up")
@option("rdm.train.config:TrainConfig.mixed_precision", "--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]))
@click.option("--ema-decay", type=float, default=None, help="EMA decay of the exported weights")
@option("rdm.train.config:TrainConfig.cond_drop", "--cond-drop", type=float,
              help="probability of an all-zeros context (classifier-free guidance)")
@click.option("--fixed-k", is_flag=True, help="always use all k neighbours (default: a random k' in [1, k] per image)")
@option("rdm.train.config:TrainConfig.dedup_threshold", "--dedup-threshold", type=float,
              help="database items at least this similar (cosine) to a training image are not its neighbours")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="[default: the --init model's, else the preset's, else epsilon]")
@click.option("--noise-schedule", type=click.Choice(["ldm", "ddpm"]), default=None,
              help="ldm: CompVis' latent schedule; ddpm: Ho et al.'s, for pixel space [default: the --init model's, "
              "else the preset's]")
@click.option("--zero-snr/--no-zero-snr", "zero_snr", default=None,
              help="rescale the noise schedule to zero terminal SNR (Lin et al. 2024; needs --prediction-type "
              "v_prediction) [default: the --init model's, else the preset's]")
@click.option("--timestep-spacing", type=click.Choice(["leading", "trailing", "linspace"]), default=None,
              help="sampling timesteps saved with the model: trailing starts at t = T (use with --zero-snr), "
              "leading is CompVis' [default: the --init model's, else the preset's]")
@option("rdm.train.config:TrainConfig.neighbour_drop", "--neighbour-drop", type=click.FloatRange(0, 1, max_open=True),
              help="probability of zeroing the neighbours alone, the query kept (trains the --style-scale context)")
@click.option("--checkpoint-every", type=click.IntRange(0), default=None, help="steps between checkpoints")
@click.option("--sample-every", type=click.IntRange(-1), default=None,
              help="steps between sample grids (0: at the end only, -1: never)")
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in --out")
@option("rdm.train.config:TrainConfig.seed", "--seed", type=int, help="initialisation, data order and noise")
@click.option("--limit", type=click.IntRange(1), default=None, help="use only the first N training images")
@option("rdm.train.config:TrainConfig.split", "--split", help="dataset split (Hugging Face sources)")
@click.option("--image-column", default=None, help="image column (Hugging Face sources)")
@click.option("--caption-column", default=None, help="caption column for --query text (Hugging Face sources) "
              "[default: detected]")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="training-data cache [default: $RDM_CACHE/train or ~/.cache/rdm/train]")
@click.option("--cpu", is_flag=True, help="train on the CPU even when a GPU is present")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (1 is fastest on a busy, "
              "shared CPU) [default: torch's]")
@click.option("--adapter", default=None, help="train a LoRA adapter NAME on top of the --init model (default: the "
              "installed model for the database's CLIP) instead of every weight; it lands in $RDM_ADAPTERS/NAME "
              "(rdm adapters) and is used with rdm sample --adapter NAME[:WEIGHT] [default lr: 1e-3]")
@click.option("--rank", type=click.IntRange(1, 1024), default=None, help="the adapter's LoRA rank " + default_text("rdm.train.config:TrainConfig.rank"))
@click.option("--lora-alpha", type=click.FloatRange(0, min_open=True), default=None,
              help="the adapter's LoRA alpha; its update is scaled by alpha / rank [default: = --rank]")
@click.option("--targets", type=click.Choice(["cross-attention", "attention", "all"]), default=None,
              help="the layers the adapter changes: the cross-attention that reads the neighbours, all attention, or "
              "attention, feed-forward and the residual blocks' convolutions " + default_text("rdm.train.config:TrainConfig.targets"))
@click.option("--quiet", is_flag=True, help="no progress bars")
@indexes_option
@click.pass_context
def train(ctx, data, db, out, preset, config, init, vae, clip, resolution, k, query, steps, batch_size, grad_accum,
          lr, lr_schedule, warmup_steps, mixed_precision, ema_decay, cond_drop, fixed_k, dedup_threshold,
          prediction_type, noise_schedule, zero_snr, timestep_spacing, neighbour_drop, checkpoint_every, sample_every,
          resume, seed, limit, split, image_column, caption_column, cache_dir, cpu, threads, adapter, rank, lora_alpha,
          targets, quiet, indexes):
    """Train (or fine-tune, or resume) a retrieval-augmented diffusion model.

    On several GPUs: accelerate launch -m rdm.cli train ... (--batch-size is per GPU).
    """
    from ..train import TrainConfig
    from ..train import train as run_training

    cfg = TrainConfig(
        data=data, db=db, out=out, preset=_preset(preset, config, "rdm.train.config:TrainConfig.preset"), init=init, vae=vae, clip=clip,
        indexes=_home(ctx, indexes), resolution=resolution, k=k, query=query, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
        mixed_precision=mixed_precision, ema_decay=ema_decay, cond_drop=cond_drop, random_k=not fixed_k,
        dedup_threshold=dedup_threshold, prediction_type=prediction_type, noise_schedule=noise_schedule,
        zero_snr=zero_snr, timestep_spacing=timestep_spacing, neighbour_drop=neighbour_drop,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every, resume=resume, seed=seed, limit=limit, split=split, image_column=image_column,
        caption_column=caption_column, cache_dir=cache_dir, cpu=cpu, threads=threads or None, progress=not quiet,
        adapter=adapter, **{k: v for k, v in dict(rank=rank, lora_alpha=lora_alpha, targets=targets).items()
                            if v is not None})
    result = run_training(cfg)
    tail = result.losses[-10:]
    d = result.data
    made = f"adapter    {result.adapter_dir} (rdm sample --adapter {adapter})" if adapter else \
        f"model      {result.model_dir}"
    click.echo(f"{made}\n"
               f"steps      {result.start_step} -> {result.step}"
               + (f", loss {sum(tail) / len(tail):.4f} (mean of the last {len(tail)})" if tail else "") + "\n"
               f"speed      {result.images_per_second:.1f} images/s "
               f"({100 * result.data_seconds / max(result.seconds, 1e-9):.1f}% assembling batches)\n"
               f"data       {d['images']} images; neighbours left out: {d['excluded_self']} self, "
               f"{d['excluded_duplicates']} near-duplicates; {d['fewer_than_k']} images with fewer than k\n"
               f"queries    {d['query']}"
               + (f" ({d['without_caption']} images without a caption use their image embedding)"
                  if d["without_caption"] else ""))


@main.command("train-vae")
@click.option("--data", required=True, help="training images: a folder, hf:ORG/NAME or a local dataset")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="AutoencoderKL folder to write")
@click.option("--preset", default=None, help="preset whose 'vae' section to train: small-latent (64x64 -> 16x16x4), tiny or base "
              + default_text("rdm.train.config:VAETrainConfig.preset"))
@click.option("--config", "config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a preset JSON file instead of --preset")
@click.option("--resolution", type=click.IntRange(1), default=None, help="image side in pixels")
@click.option("--steps", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--kl-weight", type=float, default=None, help="weight of the KL term (LDM: 1e-6)")
@option("rdm.train.config:VAETrainConfig.loss", "--loss", type=click.Choice(["l1", "l2"]), help="reconstruction loss")
@click.option("--no-hflip", is_flag=True, help="no random horizontal flips")
@option("rdm.train.config:VAETrainConfig.mixed_precision", "--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]))
@option("rdm.train.config:VAETrainConfig.seed", "--seed", type=int, help="initialisation, data order and posterior samples")
@click.option("--limit", type=click.IntRange(1), default=None, help="use only the first N images")
@option("rdm.train.config:VAETrainConfig.split", "--split", help="dataset split (Hugging Face sources)")
@click.option("--image-column", default=None, help="image column (Hugging Face sources)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out folder")
@click.option("--cpu", is_flag=True, help="train on the CPU even when a GPU is present")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads [default: torch's]")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train_vae(data, out, preset, config, resolution, steps, batch_size, lr, kl_weight, loss, no_hflip,
              mixed_precision, seed, limit, split, image_column, overwrite, cpu, threads, quiet):
    """Train the small KL autoencoder a latent-space preset needs (use it with rdm train --vae OUT)."""
    from ..train import VAETrainConfig
    from ..train import train_vae as run_vae_training

    result = run_vae_training(VAETrainConfig(
        data=data, out=out, preset=_preset(preset, config, "rdm.train.config:VAETrainConfig.preset"), resolution=resolution, steps=steps,
        batch_size=batch_size,
        lr=lr, kl_weight=kl_weight, loss=loss, hflip=not no_hflip, mixed_precision=mixed_precision, seed=seed,
        limit=limit, split=split, image_column=image_column, overwrite=overwrite, cpu=cpu, threads=threads,
        progress=not quiet))
    click.echo(f"autoencoder {result.path}\n"
               f"steps       {result.steps} in {result.seconds:.1f} s\n"
               f"latents     {'x'.join(map(str, result.latent_shape))}, scale factor {result.latent_scale_factor:.5f}\n"
               f"recon. L1   {result.reconstruction:.4f} (mean per pixel value in [-1, 1])")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
