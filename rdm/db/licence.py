"""Licence rules: which of a collection's items may condition generation.

A collection may name the metadata column that holds each item's licence and the licences that may be used
(`rdm build-index ... --licence-column licence --allow-licence cc0,cc-by`, changed later with `rdm licence NAME`).
The rule lives beside the database's manifest in `licence.json` ({"column", "allow", "attribution"}). Retrieval
for generation (rdm.sampling.conditioning.retrieve) searches only the allowed items, as a filter inside the search; search
still shows every item, each marked `licence_allowed`. Values are compared exactly, as stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import RDMError

RULE_FILE = "licence.json"
MAX_RULE_BYTES = 1 << 20  # a shared folder's rule file is read, never trusted to be small


@dataclass(frozen=True)
class LicenceRule:
    """Items whose `column` holds one of `allow` may condition generation; `attribution` names the column of the
    credit each item asks for (recorded in the provenance and the content credentials)."""

    column: str
    allow: tuple[str, ...]
    attribution: str | None = None

    def __post_init__(self):
        if not isinstance(self.column, str) or not self.column.strip():
            raise RDMError("a licence rule needs the metadata column that holds each item's licence")
        allow = tuple(str(a).strip() for a in self.allow if str(a).strip())
        if not allow:
            raise RDMError("a licence rule needs at least one allowed licence (--allow-licence cc0,cc-by)")
        object.__setattr__(self, "allow", allow)

    def to_dict(self) -> dict:
        return {"column": self.column, "allow": list(self.allow), "attribution": self.attribution}

    def allows(self, record: Mapping) -> bool:
        value = record.get(self.column)
        return value is not None and str(value) in self.allow


def parse_allow(text: str | Sequence[str]) -> tuple[str, ...]:
    """'cc0,cc-by' (or a list of such) -> ('cc0', 'cc-by')."""
    parts = [text] if isinstance(text, str) else list(text)
    return tuple(p.strip() for part in parts for p in part.split(",") if p.strip())


def read_rule(folder: str | os.PathLike, name: str = "") -> LicenceRule | None:
    """The database folder's licence rule, or None; a malformed file is an error, not an open collection."""
    path = Path(folder) / RULE_FILE
    if not path.is_file():
        return None
    what = f"database {name or Path(folder).name}: {RULE_FILE}"
    if path.stat().st_size > MAX_RULE_BYTES:
        raise RDMError(f"{what} is larger than {MAX_RULE_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RDMError(f"{what} cannot be read ({e}); fix it or set it again with `rdm licence`") from None
    if not isinstance(data, dict) or not isinstance(data.get("column"), str) \
            or not isinstance(data.get("allow"), list) or not all(isinstance(a, str) for a in data["allow"]) \
            or not isinstance(data.get("attribution"), (str, type(None))):
        raise RDMError(f"{what} is not a rule {{\"column\": str, \"allow\": [str], \"attribution\": str|null}}")
    return LicenceRule(data["column"], tuple(data["allow"]), data.get("attribution"))


def write_rule(folder: str | os.PathLike, rule: LicenceRule | None) -> Path:
    """Set (or, with None, clear) a database folder's licence rule, atomically."""
    from ..util.files import atomic_write

    path = Path(folder) / RULE_FILE
    if rule is None:
        path.unlink(missing_ok=True)
        return path
    atomic_write(path, json.dumps(rule.to_dict(), indent=2) + "\n")
    return path


def generation_where(rule: LicenceRule | None, where: Mapping[str, Sequence[str]] | None) -> dict | None:
    """The filters for retrieval that conditions generation: the caller's, narrowed to the allowed licences."""
    if rule is None:
        return dict(where) if where else None
    out = {k: list(v) for k, v in (where or {}).items()}
    asked = out.get(rule.column)
    out[rule.column] = [v for v in asked if v in rule.allow] if asked is not None else list(rule.allow)
    return out


def attributions(hits: Sequence[Mapping]) -> list[str]:
    """The credits the used items ask for (their `attribution`, which retrieval fills from a rule's attribution
    column), once each, in neighbour order."""
    return list(dict.fromkeys(str(h["attribution"]) for h in hits if h.get("attribution") not in (None, "")))


__all__ = ["LicenceRule", "RULE_FILE", "attributions", "generation_where", "parse_allow", "read_rule", "write_rule"]
