"""Databases on disk: the store (manifest, atomic commit, lock), immutable segments, FAISS indexes, the Database
(open, search, add, remove), compaction, page-cache warming, licence rules and the retrieval registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import store

if TYPE_CHECKING:
    from .database import Database


def home_path(indexes: str | None) -> Path:
    return store.indexes_home(indexes)


def open_database(db: str | Path, indexes: str | None = None) -> "Database":
    from .database import Database

    return Database.open(db, indexes)


__all__ = ["home_path", "open_database"]
