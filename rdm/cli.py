"""The `rdm` command line: a thin click layer over the library (every command is a library call)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import api
from .errors import RDMError

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
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0), help="decoding processes (0 = in-line)")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16")
@click.option("--index-factory", default=None, help='FAISS factory string, e.g. "Flat", "IVF1024,SQ8", "HNSW32"')
@click.option("--resume", is_flag=True, help="continue an interrupted build")
@click.option("--append", is_flag=True, help="add the source's new items to an existing database")
@click.option("--overwrite", is_flag=True, help="rebuild an existing database")
@click.option("--limit", type=click.IntRange(1), default=None, help="embed at most N items")
@click.option("--split", default="train", show_default=True, help="dataset split (Hugging Face sources)")
@click.option("--image-column", default=None, help="image column (Hugging Face sources)")
@click.option("--caption-column", default=None, help="caption column (Hugging Face sources)")
@click.option("--streaming", is_flag=True, help="stream the dataset instead of downloading it whole")
@indexes_option
@click.pass_context
def build_index(ctx, source, name, clip, batch_size, workers, device, dtype, index_factory, resume, append, overwrite,
                limit, split, image_column, caption_column, streaming, indexes):
    """Embed SOURCE (a folder, a dataset or an embeddings file) into a named database."""
    report = api.build_index(source, name=name, clip=clip, indexes=_home(ctx, indexes), batch_size=batch_size,
                             workers=workers, device=device, dtype=dtype, index_factory=index_factory,
                             resume=resume, append=append, overwrite=overwrite, limit=limit, split=split,
                             image_column=image_column, caption_column=caption_column, streaming=streaming)
    click.echo(api.format_report(report))


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
    """Describe database DB (a name or a database folder)."""
    data = api.open_database(db, _home(ctx, indexes)).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(api.format_info(data))


@main.command()
@click.option("--db", "db", required=True, help="database name or folder")
@click.argument("text", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(), help="query by image (repeatable)")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1))
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
    click.echo(f"removed {len(removed)} item(s) from {db}; {left} left")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
