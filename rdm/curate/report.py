"""The files `rdm curate` writes: per-item flags (parquet and JSON) and a self-contained HTML report.

The HTML embeds every thumbnail as a data URI (no server, no network): the duplicate groups side by side, the
outliers each with its nearest members, the representatives' grid (the collection's style card).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..images.sheets import thumbnail
from ..util.files import atomic_write

THUMB = 96


def item_flags(report) -> pa.Table:
    """One row per curated item: id, outlier score, duplicate-of, flags."""
    dup_of = {d: g["keep"] for g in report.duplicate_groups for d in g["drop"]}
    outlier = {o["id"] for o in report.outliers}
    ids = list(report.scores)
    return pa.table({"id": ids, "outlier_score": [report.scores[i] for i in ids],
                     "outlier": [i in outlier for i in ids], "duplicate_of": [dup_of.get(i) for i in ids],
                     "representative": [i in set(report.representatives) for i in ids]})


def _data_uri(path: str | None) -> str:
    image = thumbnail(path, THUMB)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(paths: dict, item: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(item)}" src="{_data_uri(paths.get(item))}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_report(report, paths: dict[str, str | None], max_groups: int = 50, max_outliers: int = 50) -> str:
    """The report as one HTML page; `paths`: item id -> image file (None: a blank tile)."""
    e = html.escape
    groups = "".join(
        '<div class="row">' + _figure(paths, g["keep"], f"keep {g['keep']}") +
        "".join(_figure(paths, d, f"{d} ({max((p[2] for p in g['pairs'] if d in p[:2]), default=0):.3f})")
                for d in g["drop"]) + "</div>"
        for g in report.duplicate_groups[:max_groups])
    outliers = "".join(
        '<div class="row">' + _figure(paths, o["id"], f"{o['id']} score {o['score']:.3f}") +
        "".join(_figure(paths, n, f"nearest {n}") for n in o["nearest"]) + "</div>"
        for o in report.outliers[:max_outliers])
    reps = '<div class="row">' + "".join(_figure(paths, r, r) for r in report.representatives) + "</div>"
    c = report.coherence
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rdm curate: {e(report.database)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;color:#222}} .row{{display:flex;flex-wrap:wrap;gap:8px;
margin:8px 0 16px}} figure{{margin:0;width:{THUMB}px}} img{{width:{THUMB}px;height:{THUMB}px;image-rendering:pixelated;
border:1px solid #ccc}} figcaption{{font-size:11px;word-break:break-all}} .muted{{color:#777}}</style></head>
<body><h1>rdm curate: {e(report.database)}</h1>
<p>{report.count} items; coherence: mean similarity to the k nearest {c.get('knn_similarity')}, to the centroid
{c.get('centroid_similarity')}; options {e(json.dumps(report.options))}</p>
<h2 id="duplicates">Near-duplicate groups ({len(report.duplicate_groups)}, {sum(len(g['drop']) for g in
report.duplicate_groups)} items would go)</h2>
<p class="muted">cosine &ge; {report.options['dup_threshold']}; each group keeps its first item (lowest row)</p>{groups}
<h2 id="outliers">Outliers ({len(report.outliers)})</h2><p class="muted">{e(report.outlier_rule)}</p>{outliers}
<h2 id="representatives">Representatives ({len(report.representatives)}): the style card</h2>{reps}
</body></html>
"""


def write_report(report, paths: dict[str, str | None], out: str | Path) -> dict[str, Path]:
    """OUT/curate.json, OUT/flags.parquet, OUT/report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "curate.json", "flags": out / "flags.parquet", "html": out / "report.html"}
    atomic_write(files["json"], json.dumps(report.to_dict(), indent=1) + "\n")
    table = item_flags(report)
    atomic_write(files["flags"], lambda f: pq.write_table(table, f))
    atomic_write(files["html"], html_report(report, paths))
    return files


__all__ = ["html_report", "item_flags", "write_report"]
