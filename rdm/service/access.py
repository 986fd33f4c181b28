"""Who may use the service, for what, and on which collections: API keys with scopes and allow-lists.

A key is a random token (``rdm keys add NAME``) known to the server only by its SHA-256, in a keys file
(``--keys FILE`` or ``$RDM_SERVE_KEYS``)::

    {"keys": [{"name": "design-team", "sha256": "9f2c...", "scopes": ["search", "generate", "upload"],
               "collections": ["catalog", "wikiart"], "max_jobs": 4}]}

- Scopes: ``search`` (search, items, thumbnails, clip-retrieval, curation view), ``generate`` (generate,
  compare, its own jobs), ``upload`` (image queries and images to edit), ``remove`` (takedowns), ``admin``
  (everything, every job, /api/stats). ``collections`` is an allow-list (``"*"``: every served one); a
  collection a key may not use is neither listed nor found (404, as if it did not exist).
- Anonymous callers get nothing unless the operator names collections for them (``--anonymous NAME``,
  ``"*"`` for all); they may then search, upload and generate on those.
- Without a keys file, ``rdm serve`` makes one key for its own run (all scopes, all collections) and
  prints the page's address with it (``#key=...``: the fragment never reaches a server log).
- A request names its key as ``Authorization: Bearer KEY``, or carries the ``rdm_key`` cookie the page
  gets from ``POST /api/session`` (HttpOnly, SameSite=Strict: another site's page cannot send it).
- The keys file is re-read when it changes: a key added or removed counts from the next request.
- Jobs and uploads belong to the key that made them (anonymous ones to the caller's address); another
  key gets 404 for them. ``--token-file`` (the takedown token of earlier versions) is a key named
  ``token`` with the ``remove`` scope on every collection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from filelock import FileLock

from ..errors import RDMError
from ..util.files import atomic_write
from .validation import BadRequest

log = logging.getLogger("rdm.serve")
SCOPES = ("search", "generate", "upload", "remove", "admin")
ANONYMOUS_SCOPES = ("search", "generate", "upload")
COOKIE = "rdm_key"
ALL = "*"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key (by name) or an anonymous caller (by address)."""

    name: str  # the key's name, or "anonymous"
    scopes: frozenset[str]
    collections: frozenset[str]  # allow-list; "*" = all
    owner: str  # whose jobs and uploads: "key:NAME" or "anonymous@ADDRESS"
    max_jobs: int | None = None  # jobs waiting or running at once (None: the service's per-key default)

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def may(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    def sees(self, collection: str) -> bool:
        return self.admin or ALL in self.collections or collection in self.collections

    def owns(self, owner: str) -> bool:
        return self.admin or owner == self.owner


@dataclass(frozen=True)
class Key:
    name: str
    sha256: str
    scopes: tuple[str, ...]
    collections: tuple[str, ...]
    max_jobs: int | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "sha256": self.sha256, "scopes": list(self.scopes),
             "collections": list(self.collections)}
        if self.max_jobs is not None:
            d["max_jobs"] = self.max_jobs
        return d


def _key_from(entry, where: str) -> Key:
    if not isinstance(entry, dict):
        raise RDMError(f"{where}: each key must be an object with name, sha256, scopes, collections")
    name, sha, scopes, collections = (entry.get(k) for k in ("name", "sha256", "scopes", "collections"))
    if not isinstance(name, str) or not name or len(name) > 64:
        raise RDMError(f"{where}: a key needs a name (1-64 characters)")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise RDMError(f"{where}: key {name!r}: sha256 must be 64 lowercase hex digits (the key's SHA-256; keys "
                       "themselves are never stored)")
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise RDMError(f"{where}: key {name!r}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    if not isinstance(collections, list) or any(not isinstance(c, str) or not c for c in collections):
        raise RDMError(f"{where}: key {name!r}: collections must be a list of database names (\"*\": all)")
    max_jobs = entry.get("max_jobs")
    if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
        raise RDMError(f"{where}: key {name!r}: max_jobs must be a positive integer")
    return Key(name, sha, tuple(scopes), tuple(collections), max_jobs)


def read_keys(path: str | os.PathLike) -> list[Key]:
    """The keys of a keys file; RDMError naming the problem (the file is the operator's, but still checked)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RDMError(f"no keys file {p} (make one with: rdm keys add NAME --keys {p})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RDMError(f"cannot read the keys file {p}: {e}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise RDMError(f"{p}: expected {{\"keys\": [...]}}")
    keys = [_key_from(e, str(p)) for e in entries]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise RDMError(f"{p}: two keys share a name")
    return keys


def add_key(path: str | os.PathLike, name: str, scopes: tuple[str, ...], collections: tuple[str, ...],
            max_jobs: int | None = None) -> str:
    """Make a key, store its SHA-256 under `name` in the keys file (created if missing), return the key itself
    (shown once: it cannot be recovered from the file)."""
    p = Path(path)
    token = "rdm-" + secrets.token_urlsafe(32)
    key = _key_from({"name": name, "sha256": digest(token), "scopes": list(scopes), "collections": list(collections),
                     "max_jobs": max_jobs}, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock"):
        keys = read_keys(p) if p.exists() else []
        if any(k.name == name for k in keys):
            raise RDMError(f"{p} already has a key named {name!r} (rdm keys remove {name} first)")
        atomic_write(p, json.dumps({"keys": [k.to_dict() for k in keys + [key]]}, indent=2) + "\n")
    os.chmod(p, 0o600)
    return token


def remove_key(path: str | os.PathLike, name: str) -> None:
    p = Path(path)
    with FileLock(str(p) + ".lock"):
        keys = read_keys(p)
        if not any(k.name == name for k in keys):
            raise RDMError(f"{p} has no key named {name!r}")
        atomic_write(p, json.dumps({"keys": [k.to_dict() for k in keys if k.name != name]}, indent=2) + "\n")


class Access:
    """The service's keys (by SHA-256) and its anonymous rule; `principal` says who a request is."""

    def __init__(self, keys: list[Key], anonymous: tuple[str, ...] = (), keys_file: str | None = None):
        self.fixed = list(keys)  # the run's own key and the takedown token
        self.keys_file = Path(keys_file) if keys_file else None
        self.anonymous = frozenset(anonymous)
        self._lock = threading.Lock()
        self._stamp = None
        self.by_digest = {k.sha256: k for k in self.fixed}
        self._refresh(first=True)

    @classmethod
    def from_config(cls, config) -> Access:
        keys = []
        if config.session_key:
            keys.append(Key("session", digest(config.session_key), ("admin",), (ALL,)))
        if config.token:
            keys.append(Key("token", digest(config.token), ("remove",), (ALL,)))
        return cls(keys, config.anonymous, config.keys)

    def _refresh(self, first: bool = False) -> None:
        """Re-read the keys file when it changed, so that rdm keys add / remove take effect at the next request. At
        start a bad file stops the service; later, a file that cannot be read keeps the keys read before (logged)."""
        if self.keys_file is None:
            return
        try:
            st = self.keys_file.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp and not first:
            return
        with self._lock:
            if stamp == self._stamp and not first:
                return
            try:
                keys = read_keys(self.keys_file)
            except RDMError as e:
                if first:
                    raise
                log.warning("the keys file was not re-read; the keys read before stay: %s", e)
            else:
                self.by_digest = {k.sha256: k for k in self.fixed + keys}
            self._stamp = stamp

    def key_for(self, token: str) -> Key | None:
        self._refresh()
        return self.by_digest.get(digest(token))  # looked up by the token's digest: its timing says nothing of it

    def principal(self, token: str | None, address: str) -> Principal | None:
        """The caller with this token (None: no token); BadRequest 401 for a token that is not a key."""
        if token:
            key = self.key_for(token)
            if key is None:
                raise BadRequest(401, "this key is not valid here (revoked, mistyped, or for another service)",
                                 {"WWW-Authenticate": "Bearer"})
            return Principal(key.name, frozenset(key.scopes), frozenset(key.collections), "key:" + key.name,
                             key.max_jobs)
        if self.anonymous:
            return Principal("anonymous", frozenset(ANONYMOUS_SCOPES), self.anonymous, "anonymous@" + address)
        return None


_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer KEY (rdm keys add)")
_cookie = APIKeyCookie(name=COOKIE, auto_error=False, description="the page's session cookie (POST /api/session)")


def caller(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
           cookie: str | None = Depends(_cookie)) -> Principal | None:
    """FastAPI dependency: the request's Principal (None: no key, and no anonymous access); a key's use is audited."""
    token = bearer.credentials if bearer is not None else cookie
    address = request.client.host if request.client else ""
    who = request.app.state.access.principal(token, address)
    if who is not None:
        request.state.rdm_key = who.name  # for the audit of a refusal later in the request
    if token and who is not None:
        request.app.state.audit.record("use", key=who.name, method=request.method, path=request.url.path,
                                       caller=address)
    return who


def require(who: Principal | None, scope: str | None, collections=()) -> Principal:
    """The caller, if it may `scope` on every one of `collections`: 401 without a key, 403 without the scope, 404
    for a collection it may not see (as if there were none: an allow-list does not reveal what else is served)."""
    if who is None:
        raise BadRequest(401, "a key is needed: send 'Authorization: Bearer KEY' (keys are made with rdm keys add; "
                              "rdm serve prints a link to its page with a key when it runs without a keys file)",
                         {"WWW-Authenticate": "Bearer"})
    if scope is not None and not who.may(scope) and who.name == "anonymous":  # a key might: say so
        raise BadRequest(401, f"a key with the {scope} scope is needed: send 'Authorization: Bearer KEY'",
                         {"WWW-Authenticate": "Bearer"})
    if scope is not None and not who.may(scope):
        raise BadRequest(403, f"the key {who.name!r} may not {scope} (its scopes: {', '.join(sorted(who.scopes))})")
    for name in collections:
        if not who.sees(name):
            raise BadRequest(404, f"no database {name!r} among those this key may use")
    return who


__all__ = ["ALL", "ANONYMOUS_SCOPES", "COOKIE", "SCOPES", "Access", "Key", "Principal", "add_key", "caller", "digest",
           "read_keys", "remove_key", "require"]
