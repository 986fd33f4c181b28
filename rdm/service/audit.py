"""The service's audit log: one JSON line per takedown, per request made with a key ("use") and per refused request,
with who asked (the key's name and the caller's address) and what (the database, the ids, the status and the reason).

Appended and flushed line by line (a killed server loses at most the line being written); off unless
`ServeConfig.audit_log` names a file.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path

AUDITED = (401, 403, 413, 429)  # refusals that say something about a caller, not about a typo


class Audit:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                           "event": event, **fields}, sort_keys=True, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def refused(self, scope_or_request, status: int, reason: str) -> None:
        """A refused request, when its status is one of AUDITED."""
        if self.path is None or status not in AUDITED:
            return
        scope = getattr(scope_or_request, "scope", scope_or_request)
        client = (scope.get("client") or ("", 0))[0]
        key = (scope.get("state") or {}).get("rdm_key")  # set by rdm.service.access.caller once a key is known
        self.record("refused", status=status, method=scope.get("method"), path=scope.get("path"), caller=client,
                    reason=reason, **({"key": key} if key else {}))


__all__ = ["AUDITED", "Audit"]
