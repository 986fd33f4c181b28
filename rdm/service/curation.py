"""The page's curation view of a served database: rdm curate's report as the API shows it (ids and thumbnail URLs,
never file paths)."""

from __future__ import annotations

from ..curate import CurateReport
from .jobs import neighbour_view


def item_view(database: str, item_id: str) -> dict:
    view = neighbour_view({"database": database, "id": item_id})
    return {"id": item_id, "thumbnail_url": view["thumbnail_url"]}


def curation_view(report: CurateReport, database: str, show: int) -> dict:
    """What the page draws: the coherence, the first `show` duplicate groups (kept item and its copies, with the
    highest similarity) and outliers (with their nearest members), and the style card."""
    groups = [{"keep": item_view(database, g["keep"]), "drop": [item_view(database, d) for d in g["drop"]],
               "similarity": max(p[2] for p in g["pairs"])} for g in report.duplicate_groups[:show]]
    outliers = [{"item": item_view(database, o["id"]), "score": o["score"],
                 "nearest": [item_view(database, n) for n in o["nearest"]]} for o in report.outliers[:show]]
    return {"database": database, "count": report.count, "coherence": report.coherence,
            "duplicate_group_count": len(report.duplicate_groups),
            "duplicate_count": sum(len(g["drop"]) for g in report.duplicate_groups),
            "outlier_count": len(report.outliers), "outlier_rule": report.outlier_rule,
            "duplicate_threshold": report.options["dup_threshold"], "k": report.options["k"],
            "duplicate_groups": groups, "outliers": outliers,
            "representatives": [item_view(database, r) for r in report.representatives]}
