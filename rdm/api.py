"""The commands as plain functions a notebook can call (the CLI only parses arguments): a facade, no logic of its own.

Each name is the library function that does the work; heavy libraries (torch, open_clip, faiss) are imported by the
functions that need them, so that `rdm --help`, `rdm list` and `rdm info` answer at once.
"""

from __future__ import annotations

from .build import build_index, default_name, format_report
from .curate import run as curate
from .db import home_path, open_database
from .db.commands import compact, embed_queries, format_info, info, list_databases, remove, search, set_licence, verify
from .embed import embedder_for, load_embedder
from .images.sheets import search_sheet as write_search_sheet

__all__ = ["build_index", "compact", "curate", "default_name", "embed_queries", "embedder_for", "format_info",
           "format_report", "home_path", "info", "list_databases", "load_embedder", "open_database", "remove",
           "search", "set_licence", "verify", "write_search_sheet"]
