"""The FastAPI application: the API, the clip-retrieval endpoints, the page, and the trust rules.

Trust: requests from other machines are refused unless the service was started with allow_network
(and, on loopback, a Host header naming another site is refused, against DNS rebinding); writes
(remove) need the bearer token from --token-file; request bodies are capped before they are read
whole. Every refusal is JSON {"error": message} with a 4xx status; an unexpected failure is a 500
with a one-line message, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import replace
from importlib import resources
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..curate import CurateOptions, curate
from ..db.database import Database
from ..errors import DatabaseBusy, RDMError
from ..sampling import editing
from ..sampling.conditioning import NeighbourControl, parse_window
from ..sampling.credentials import public_provenance  # what leaves the server: ids, never paths
from ..sampling.pipeline import SCHEDULER_ALIASES, check_sampler, make_scheduler
from ..sampling.selection import Selection
from .access import COOKIE, Access, Principal, caller, require
from .clip_retrieval_compat import HIDDEN_COLUMNS
from .clip_retrieval_compat import router as clip_router
from .audit import Audit
from .config import ServeConfig, is_loopback_host
from .contract import openapi_schema
from .curation import curation_view
from .engine import Engine, Row
from .images import ImageCache, render_file
from .jobs import FINAL, Job, JobQueue, job_view, neighbour_view
from .validation import (
    ERROR_RESPONSES,
    MAX_JSON_ITEMS,
    SSE_EVENT,
    BadRequest,
    CompareRequest,
    GenerateRequest,
    ItemRef,
    RemoveRequest,
    SearchRequest,
    SessionRequest,
    check_embedding,
    check_float,
    check_id,
    check_int,
    check_text,
    check_where,
    collections_of,
    describe_validation,
    lone_surrogate,
    longest_list,
    refusal,
)

log = logging.getLogger("rdm.serve")
STATIC = resources.files("rdm.service") / "static"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
                                                 b"style-src 'self'; script-src 'self'; frame-ancestors 'none'")]


# --- ASGI middleware: who may ask, and how much they may send ---------------------------------------

class Guard:
    """Refuses non-loopback clients (unless allow_network), foreign Host headers on loopback, oversized bodies."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config
        self.audit = Audit(config.audit_log)
        self.max_body = config.max_upload_bytes * 4 // 3 + 256 * 1024  # a base64 image inside JSON

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal:
            self.audit.refused(scope, *refusal)
            return await _send_json(send, *refusal)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge()
            return message

        async def secure_send(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = dict(scope.get("headers") or [])
        app_receive = limited_receive
        if scope.get("method") in ("POST", "PUT", "PATCH") and \
                not headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            try:  # a JSON body (bounded by max_body) read here once, checked, then handed on as it came
                body, more = b"", True
                while more:
                    message = await limited_receive()
                    if message["type"] != "http.request":
                        break
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
            except _TooLarge:
                return await _send_json(send, 413, f"request body larger than {self.max_body} bytes")
            if lone_surrogate(body):
                return await _send_json(send, 400, "malformed JSON: a string holds a lone UTF-16 surrogate "
                                                   "(\\ud800-\\udfff unpaired), which is not text")
            try:  # bounded before any model sees it: a long list would cost an error object per element
                longest = longest_list(json.loads(body)) if body else 0
            except (ValueError, RecursionError):
                longest = 0  # malformed: the route's own parsing says how
            if longest > MAX_JSON_ITEMS:  # a validation failure (422), audited as a refusal of size
                self.audit.record("refused", status=422, method=scope.get("method"), path=scope.get("path"),
                                  caller=(scope.get("client") or ("", 0))[0], reason=f"a list of {longest}+ items")
                return await _send_json(send, 422, f"a list in the request holds more than {MAX_JSON_ITEMS} items")
            replayed = False

            async def app_receive():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: disconnects
        try:
            await self.app(scope, app_receive, secure_send)
        except _TooLarge:
            await _send_json(send, 413, f"request body larger than {self.max_body} bytes")

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request body larger than {self.max_body} bytes"
        cross = _cross_site(scope.get("method", ""), headers)
        if cross:
            return 403, cross
        if self.config.allow_network:
            return None
        client = (scope.get("client") or ("", 0))[0]
        if not is_loopback_host(client or ""):
            return 403, ("this service answers this machine only; start rdm serve with --allow-network to open "
                         "generation and search to a network")
        host = headers.get(b"host", b"").decode("latin-1")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
        if host and not is_loopback_host(hostname):
            return 403, f"Host {host!r} is not this machine (start with --allow-network to serve other names)"
        return None


def _cross_site(method: str, headers: dict) -> str | None:
    """Why a browser request from another site is refused (None when it is not one). A web page the user visits can
    send text/plain and multipart POSTs to 127.0.0.1 with no CORS preflight; the browser names that page in Origin
    (and Sec-Fetch-Site). Clients that are not browsers send neither and pass; the service's own page is same-origin."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return None
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if site == "cross-site" or (origin and origin != "null" and urlsplit(origin).netloc != host) or origin == "null":
        return (f"a {method} from another site ({origin or site}) is refused: only this service's own page, or a "
                "client that is not a browser, may send one")
    return None


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})


# --- the application -------------------------------------------------------------------------------

def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The service around a loaded Engine; the caller serves it (rdm.service.server) and stops `app.state.queue`."""
    app = FastAPI(title="rdm serve", version="1", summary="Retrieval-augmented diffusion: search, generate, compare",
                  docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    app.state.engine, app.state.config = engine, config
    app.state.queue = JobQueue(engine, config)
    app.state.access = access = Access.from_config(config)
    app.state.uploads = OrderedDict()  # upload id -> ((1, D) vector, info)
    app.state.upload_owners = OrderedDict()  # upload id -> owner (Principal.owner): another key's uploads are not found
    app.state.upload_images = OrderedDict()  # upload id -> (PIL image, {"name", "sha256"}) for editing
    app.state.images = ImageCache()
    app.state.curations = OrderedDict()  # (fingerprint, k, representatives) -> CurateReport, the last 8
    app.state.audit = audit = Audit(config.audit_log)
    queue: JobQueue = app.state.queue

    @app.exception_handler(BadRequest)
    async def _bad(request, e: BadRequest):
        audit.refused(request, e.status, e.message)
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return JSONResponse({"error": f"malformed JSON: {errors[0].get('ctx', {}).get('error', 'cannot parse')}"},
                                status_code=400)
        return JSONResponse({"error": describe_validation(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        message = (f"no such endpoint: {request.method} {request.url.path} (the API is listed at /docs)"
                   if e.status_code in (404, 405) else str(e.detail))
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:  # every method the path has, not only those of the first route that matched it
            probe = {**request.scope, "method": ""}
            methods = {m for r in app.router.routes if getattr(r, "methods", None) and r.matches(probe)[0] != Match.NONE
                       for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"error": message}, status_code=e.status_code, headers=headers or None)

    @app.exception_handler(RDMError)
    async def _rdm(_request, e: RDMError):
        return JSONResponse({"error": str(e)}, status_code=409 if isinstance(e, DatabaseBusy) else refusal(e).status)

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):
        log.exception("unexpected error")
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    app.include_router(clip_router)
    # Swagger UI's files from fastapi-offline, served here (its CDN would break the CSP); mounted before /static
    app.mount("/static/swagger", StaticFiles(directory=str(resources.files("fastapi_offline") / "static")),
              name="swagger")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/docs", include_in_schema=False)
    def api_docs():
        return FileResponse(str(STATIC / "docs.html"), media_type="text/html")

    # -- the page and service info --------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/api/health", tags=["service"])
    def health():
        return {"ok": True}

    @functools.cache
    def usable_schedulers() -> list[str]:
        """The scheduler names this model can sample with here (its schedule kept, their packages installed)."""
        usable = []
        for name in SCHEDULER_ALIASES:
            try:
                check_sampler(make_scheduler(name, engine.pipe.scheduler), max(4, engine.pipe.sampling_defaults
                                                                               .num_inference_steps))
                usable.append(name)
            except RDMError:
                pass
        return usable

    @app.get("/api/info", tags=["service"])
    def info(who: Principal | None = Depends(caller)):
        require(who, None)
        rc, own = engine.pipe.rdm_config, engine.pipe.sampling_defaults  # the model's own sampler settings
        return {"model": {"name": engine.pipe.name_or_path and str(engine.pipe.name_or_path).rsplit("/", 1)[-1],
                          "fingerprint": engine.pipe.fingerprint, "resolution": rc.resolution, "k": rc.k,
                          "embedder": rc.embedder.get("model", "").rsplit("/", 1)[-1], "dim": rc.embedding_dim},
                "defaults": {"steps": own.num_inference_steps, "guidance": own.guidance_scale,
                             "guidance_rescale": own.guidance_rescale, "scheduler": own.scheduler, "eta": own.eta,
                             "k": rc.k, "seed": 0},
                "limits": {"max_k": config.max_k, "max_search_k": config.max_search_k, "max_steps": config.max_steps,
                           "max_images": config.max_images, "max_compare_rows": config.max_compare_rows,
                           "max_upload_bytes": config.max_upload_bytes, "max_queue": config.max_queue,
                           "max_batch": config.max_batch},
                "adapters": [{"name": a.name, "rank": a.rank, "targets": a.targets, "database": a.database,
                              "steps": a.steps, "bytes": a.bytes, "sha256": a.sha256} for a in engine.adapters.values()],
                "schedulers": usable_schedulers(), "writes_enabled": who.may("remove"),
                "url_fetching": config.allow_urls,
                "you": {"key": who.name, "scopes": sorted(who.scopes), "admin": who.admin}}

    @app.get("/api/stats", tags=["service"])
    def stats(who: Principal | None = Depends(caller)):
        require(who, "admin")
        return {**queue.stats(), "adapter_loads": engine.pipe.adapter_loads}

    # -- the page's session: a key held in an HttpOnly, SameSite=Strict cookie -------------------------
    @app.post("/api/session", tags=["service"], summary="check a key and keep it in the page's cookie")
    def session_open(body: SessionRequest, request: Request):
        who = access.principal(body.key, request.client.host if request.client else "")
        view = {"key": who.name, "scopes": sorted(who.scopes), "admin": who.admin}
        response = JSONResponse(view)
        response.set_cookie(COOKIE, body.key, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.get("/api/session", tags=["service"], summary="who this request is (its key's name and scopes)")
    def session_show(who: Principal | None = Depends(caller)):
        who = require(who, None)
        return {"key": who.name, "scopes": sorted(who.scopes), "admin": who.admin}

    @app.delete("/api/session", tags=["service"], summary="forget the page's key (its cookie)")
    def session_close():
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- databases ------------------------------------------------------------------------------------
    def public_info(db) -> dict:
        d = db.info()
        sources = [{k: v for k, v in s.items() if k != "path"} for s in d.get("sources", []) if isinstance(s, dict)]
        return {"name": db.name, "count": db.count, "dim": db.dim, "fingerprint": db.fingerprint,
                "compatible": engine.compatible(db), "embedder": d["embedder"].get("model", "").rsplit("/", 1)[-1],
                "index_factory": d.get("index_factory"), "created": d.get("created"), "updated": d.get("updated"),
                "columns": [c for c in d.get("columns", []) if c not in HIDDEN_COLUMNS], "sources": sources,
                "skipped": len(d.get("skipped", []))}

    @app.get("/api/databases", tags=["databases"])
    def databases(who: Principal | None = Depends(caller)):
        who = require(who, None)
        out = []
        for name in (n for n in engine.registry.names() if who.sees(n)):  # what a key may not use is not listed
            try:
                out.append(public_info(engine.registry.get(name)))
            except RDMError as e:
                out.append({"name": name, "error": str(e), "compatible": False})
        return out

    @app.get("/api/databases/{name}", tags=["databases"])
    def database_info(name: str, who: Principal | None = Depends(caller)):
        require(who, None, [name])
        return public_info(_served(name))

    def _served(name: str):
        try:
            return engine.registry.get(name)
        except RDMError as e:
            raise BadRequest(404, str(e)) from None

    @app.get("/api/databases/{name}/items", tags=["databases"])
    def item(name: str, id: str = Query(..., description="item id"),  # noqa: A002
             who: Principal | None = Depends(caller)):
        require(who, None, [name])
        db = _served(name)
        found = db.lookup(check_id(id))
        if found is None:
            raise BadRequest(404, f"database {name} has no item {id!r}")
        record = found[0]
        return {**{k: v for k, v in record.items() if k not in HIDDEN_COLUMNS + ("score", "row")},
                "thumbnail_url": neighbour_view({"database": name, "id": record["id"]})["thumbnail_url"]}

    @app.get("/api/databases/{name}/image", tags=["databases"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def database_image(name: str, id: str = Query(...),  # noqa: A002
                       size: str = Query("thumb", pattern="^(thumb|full)$"),
                       who: Principal | None = Depends(caller)):
        require(who, None, [name])
        db = _served(name)
        found = db.lookup(check_id(id))
        if found is None:
            raise BadRequest(404, f"database {name} has no item {id!r}")
        path = db.image_file(found[0])
        if path is None:
            raise BadRequest(404, f"item {id!r} of {name} has no image file inside the database's source folder")
        side = config.thumb_size if size == "thumb" else 1024
        data = app.state.images.get_or_make((db.fingerprint, id, side), lambda: render_file(path, side, config))
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @app.get("/api/databases/{name}/curate", tags=["databases"],
             summary="rdm curate on a served database: near-duplicate groups, outliers, the style card",
             responses={404: {"description": "no such database"},
                        413: {"description": "larger than the service curates (run rdm curate NAME --out DIR)"}})
    async def database_curate(name: str, k: int = Query(CurateOptions.k, ge=1, le=100),
                              representatives: int = Query(CurateOptions.n_representatives, ge=0, le=64),
                              who: Principal | None = Depends(caller)):
        require(who, "search", [name])
        db = _served(name)
        if db.count > config.curate_max_items:
            raise BadRequest(413, f"database {name} holds {db.count} items; the service curates at most "
                                  f"{config.curate_max_items} (run: rdm curate {name} --out DIR, and open DIR/report.html)")
        key = (db.fingerprint, k, representatives)
        cache = app.state.curations
        if key not in cache:
            options = CurateOptions(k=k, n_representatives=representatives)
            # a Database of its own (the served one is shared by searches and is not thread-safe), same generation
            own = await run_in_threadpool(Database.open, db.database.path)
            cache[key] = await run_in_threadpool(curate, own, options)
            while len(cache) > 8:
                cache.popitem(last=False)
        return curation_view(cache[key], name, config.curate_show)

    @app.post("/api/databases/{name}/remove", tags=["databases"])
    def remove(name: str, body: RemoveRequest, request: Request, who: Principal | None = Depends(caller)):
        who = require(who, "remove", [name])
        db = _served(name)
        where = check_where(body.where, hidden=True)  # the operator's takedown may name files
        if not body.ids and not where:
            raise BadRequest(422, "nothing to remove: give ids or a where filter")
        clauses = [f"{col}={v}" for col, values in (where or {}).items() for v in values]
        try:
            removed = db.remove(ids=[check_id(i) for i in body.ids], where=clauses or None)
        except RDMError as e:  # ids or columns it does not hold: nothing removed
            raise refusal(e) from None
        log.info("takedown in %s: %d item(s) removed", name, len(removed))
        audit.record("takedown", database=name, ids=removed, where=clauses, by=who.name,
                     caller=(request.client.host if request.client else ""))
        return {"database": name, "removed": removed, "count": engine.registry.get(name).count}

    # -- queries --------------------------------------------------------------------------------------
    def query_of(text: str | None, image: ItemRef | None, embedding: list | None, dim: int, who: Principal):
        """(1, D) query vector and its provenance record from exactly one of text, image, embedding."""
        given = [n for n, v in (("prompt/text", text), ("image", image), ("embedding", embedding)) if v is not None]
        if len(given) != 1:
            raise BadRequest(422, f"give exactly one query (prompt or text, image, embedding); got "
                                  f"{', '.join(given) or 'none'}")
        if text is not None:
            return engine.embed_text(check_text("prompt", text, config)), {"prompt": text}
        if embedding is not None:
            return check_embedding(embedding, dim), {"embedding": True}
        if image.upload is not None and image.database is None and image.id is None:
            found = app.state.uploads.get(image.upload) if owned(image.upload, who) else None
            if found is None:
                raise BadRequest(404, f"no upload {image.upload!r} (uploads are kept for a while only; upload again)")
            return found[0], {"image": f"upload {image.upload}"}
        if image.database is not None and image.id is not None and image.upload is None:
            _, vector = engine.item(image.database, check_id(image.id))
            return vector[None, :], {"image": f"{image.database}/{image.id}"}
        raise BadRequest(422, "image: give {\"upload\": ID} or {\"database\": NAME, \"id\": ITEM}")

    @app.post("/api/uploads", tags=["search"], summary="upload an image query; returns its id")
    async def upload(file: UploadFile = File(...), who: Principal | None = Depends(caller)):
        who = require(who, "upload")
        data = await file.read(config.max_upload_bytes + 1)
        vector, size = await run_in_threadpool(engine.embed_image_bytes, data)
        image = await run_in_threadpool(engine.editable_image, data)
        digest = hashlib.sha256(data).hexdigest()
        upload_id = "u-" + secrets.token_hex(12)  # random: an id must not tell whether someone uploaded an image
        for store, value, limit in ((app.state.upload_owners, who.owner, config.uploads_kept),
                                    (app.state.uploads, (vector, {"width": size[0], "height": size[1]}),
                                     config.uploads_kept),
                                    (app.state.upload_images, (image, {"name": "upload " + upload_id,
                                                                       "sha256": digest}), config.upload_images_kept)):
            store[upload_id] = value
            store.move_to_end(upload_id)
            while len(store) > limit:
                store.popitem(last=False)
        return {"upload": upload_id, "width": size[0], "height": size[1]}

    def owned(upload_id: str, who: Principal) -> bool:
        return who.owns(app.state.upload_owners.get(upload_id))

    @app.post("/api/search", tags=["search"])
    def search(body: SearchRequest, who: Principal | None = Depends(caller)):
        who = require(who, "search", collections_of(body))
        db = engine.database(body.database)
        k = check_int("k", body.k, 1, config.max_search_k)
        query, record = query_of(body.text, body.image, body.embedding, db.dim, who)
        try:
            result = db.search(query, k=k, where=check_where(body.where))
        except RDMError as e:
            raise refusal(e) from None
        hits = []
        for h in result.hits(0):
            view = neighbour_view({"database": db.name, **h})
            view["metadata"] = {k2: v for k2, v in h.items() if k2 not in HIDDEN_COLUMNS + ("id", "score", "row")}
            view["image_url"] = view["thumbnail_url"].replace("size=thumb", "size=full")
            hits.append(view)
        return {"database": db.name, "fingerprint": db.fingerprint, "query": record, "results": hits}

    # -- generation -----------------------------------------------------------------------------------
    def check_sampling(body) -> tuple[int, int]:
        n = check_int("num_images", body.num_images, 1, config.max_images)
        check_int("seed", body.seed, 0, 2**31 - 1 - config.max_images)  # image i gets seed + i
        if body.steps is not None:
            check_int("steps", body.steps, 1, config.max_steps)
        if body.guidance is not None:
            check_float("guidance", body.guidance, -config.max_guidance, config.max_guidance)
        k = engine.pipe.rdm_config.k if body.k is None else check_int("k", body.k, 0, config.max_k)
        return n, k

    def neighbour_control(body) -> NeighbourControl:
        """The request's control over the neighbours; 422 for values out of range or unknown databases."""
        negatives = body.negative_databases or []
        if body.negative_prompt is not None:
            check_text("negative_prompt", body.negative_prompt, config)
        try:
            selection = Selection(diversity=body.diversity, dedup=body.dedup, max_per=body.max_per or {})
            return NeighbourControl(
                selection=selection, weighting=body.neighbour_weights, content_subtract=body.content_subtract,
                negative_databases=[(engine.database(c.name), c.weight) for c in negatives] or None,
                negative_prompt=body.negative_prompt,
                window=tuple(sorted(parse_window(body.neighbour_window))))
        except RDMError as e:
            raise BadRequest(422, str(e)) from None

    def rows_for(query, record, choices, k, where, body, n, label) -> list[Row]:
        control = neighbour_control(body)
        neighbours = engine.neighbours(query, choices, k if choices else 0, where, control.selection,
                                       control.weighting)
        settings = replace(engine.settings(neighbours.k, body.steps, body.guidance, body.scheduler, body.eta,
                                           body.guidance_rescale, control),
                           adapters=engine.adapter_choice(body.adapters))
        weights = None if neighbours.weights is None else neighbours.weights[0]
        return [Row(query[0], neighbours.embeddings[0], neighbours.hits[0], neighbours.drawn, neighbours.notes,
                    weights, where or {}, body.seed + i, record, settings, label) for i in range(n)]

    def edit_of(body, has_query: bool, who: Principal):
        """The request's prepared edit (rdm.sampling.editing.Edit) or None; 404 for an upload no longer kept, 422 for a bad
        strength, mask or canvas. Its image is the query when the request gives none."""
        if body.init_image is None:
            if body.strength is not None or body.mask is not None or body.extend is not None or \
                    body.aspect is not None:
                raise BadRequest(422, "strength, mask, extend and aspect edit an image: give init_image")
            return None
        image, source = kept_image(body.init_image, "init_image", who)
        mask = None
        if body.mask is not None:
            mask_image, _ = kept_image(body.mask, "mask", who)
            mask = mask_image
        try:
            e = editing.prepare_edit(image, body.strength, mask, body.mask_feather,
                                     tuple(body.extend) if body.extend is not None else None, body.aspect,
                                     resolution=engine.pipe.rdm_config.resolution, multiple=engine.pipe.size_multiple)
        except RDMError as err:
            raise BadRequest(422, str(err)) from None
        e.source = {**source, "size": e.source["size"]}
        return e

    def kept_image(ref: ItemRef, what: str, who: Principal):
        """(PIL image, {"name", "sha256"}) of an upload still kept, or of a database item (init_image only)."""
        if ref.upload is not None and ref.database is None and ref.id is None:
            found = app.state.upload_images.get(ref.upload) if owned(ref.upload, who) else None
            if found is None:
                raise BadRequest(404, f"{what}: no upload {ref.upload!r} (uploads are kept for a while only; upload "
                                      "again)")
            return found
        if what == "init_image" and ref.database is not None and ref.id is not None and ref.upload is None:
            db = _served(ref.database)
            found = db.lookup(check_id(ref.id))
            if found is None:
                raise BadRequest(404, f"database {ref.database} has no item {ref.id!r}")
            path = db.image_file(found[0])
            if path is None:
                raise BadRequest(404, f"item {ref.id!r} of {ref.database} has no image file inside the database's "
                                      "source folder; upload the image instead")
            data = path.read_bytes()
            return engine.editable_image(data), {"name": f"{ref.database}/{ref.id}",
                                                 "sha256": hashlib.sha256(data).hexdigest()}
        raise BadRequest(422, f"{what}: give {{\"upload\": ID}}" + (" or {\"database\": NAME, \"id\": ITEM}"
                                                                     if what == "init_image" else ""))

    def edit_query(body, e, text, who: Principal):
        """(query, record) of an edit request: the prompt (or image query) when given, else the init image."""
        if text is not None or getattr(body, "image", None) is not None:
            query, record = query_of(text, getattr(body, "image", None), None, engine.dim, who)
            return query, {**record, "from": "prompt" if text is not None else "image"}
        query = engine.embedder.encode_images([e.image])  # (1, D): the working image's CLIP embedding
        return query, {"image": e.source.get("name", "init image"), "from": "init_image"}

    def with_edit(rows: list[Row], e) -> list[Row]:
        if e is None:
            return rows
        key = (e.source.get("sha256"), e.strength, None if e.mask_source is None else e.mask_source.get("sha256"),
               e.feather, e.extend, e.image.size)
        for row in rows:
            row.settings = replace(row.settings, edit=key, height=e.image.height, width=e.image.width)
            row.edit = e
        return rows

    def describe(choices) -> str:
        return ", ".join(c.name if c.weight == 1.0 else f"{c.name}:{c.weight:g}" for c in choices) or "no database"

    @app.post("/api/generate", tags=["generate"], status_code=202)
    def generate(body: GenerateRequest, request: Request, who: Principal | None = Depends(caller)):
        who = require(who, "generate", collections_of(body))
        queue.admit(who.owner, who.max_jobs)  # a full share is refused before the query is embedded
        n, k = check_sampling(body)
        e = edit_of(body, body.prompt is not None or body.image is not None, who)
        query, record = edit_query(body, e, body.prompt, who) if e is not None else \
            query_of(body.prompt, body.image, None, engine.dim, who)
        where = check_where(body.where)
        rows = with_edit(rows_for(query, record, body.databases, k, where, body, n, describe(body.databases)), e)
        summary = {**body.model_dump(exclude_none=True), "query": record}
        job = queue.submit(Job("generate", rows, summary, [describe(body.databases)], owner=who.owner),
                           who.max_jobs)
        return JSONResponse(job_view(job, queue), status_code=202)

    @app.post("/api/compare", tags=["generate"], status_code=202)
    def compare(body: CompareRequest, who: Principal | None = Depends(caller)):
        who = require(who, "generate", collections_of(body))
        queue.admit(who.owner, who.max_jobs)
        n, k = check_sampling(body)
        if not 1 <= len(body.rows) <= config.max_compare_rows:
            raise BadRequest(422, f"compare takes 1 to {config.max_compare_rows} rows, got {len(body.rows)}")
        e = edit_of(body, body.prompt is not None, who)
        query, record = edit_query(body, e, body.prompt, who) if e is not None else \
            query_of(body.prompt, None, None, engine.dim, who)
        where = check_where(body.where)
        rows, labels = [], []
        for choices in body.rows:
            labels.append(describe(choices))
            rows += with_edit(rows_for(query, record, choices, k, where, body, n, labels[-1]), e)
        job = queue.submit(Job("compare", rows, {**body.model_dump(exclude_none=True), "query": record}, labels,
                               owner=who.owner), who.max_jobs)
        return JSONResponse(job_view(job, queue), status_code=202)

    # -- jobs -----------------------------------------------------------------------------------------
    def own_job(job_id: str, who: Principal | None) -> Job:
        """The job, if it is the caller's (another key's job is not found: its id says nothing)."""
        who = require(who, None)
        job = queue.get(job_id)
        if not who.owns(job.owner):
            raise BadRequest(404, f"no job {job_id!r} (unknown, or its results were dropped to free memory)")
        return job

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def job_status(job_id: str, who: Principal | None = Depends(caller)):
        return job_view(own_job(job_id, who), queue)

    @app.delete("/api/jobs/{job_id}", tags=["jobs"], summary="cancel a job and forget it (its final view is returned; "
                "its event stream ends with it)")
    def job_cancel(job_id: str, who: Principal | None = Depends(caller)):
        job = queue.cancel(own_job(job_id, who).id)
        view = job_view(job, queue)
        queue.forget(job.id)
        return view

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"], summary="server-sent events: progress, then the final state",
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
    async def job_events(job_id: str, request: Request, who: Principal | None = Depends(caller)):
        job = own_job(job_id, who)

        async def stream():
            seen, beat = -1, 0.0
            while True:
                job.last_seen = time.monotonic()
                if job.version != seen:
                    seen = job.version
                    view = await run_in_threadpool(job_view, job, queue)
                    final = view["state"] in FINAL  # the state the view shows, not the job's a moment later
                    yield f"event: {view['state'] if final else 'progress'}\ndata: {json.dumps(view)}\n\n"
                    if final:
                        return
                    beat = 0.0
                elif beat > 10:
                    yield ": keep-alive\n\n"
                    beat = 0.0
                await asyncio.sleep(0.1)  # a client that goes away ends the stream (Starlette cancels it)
                beat += 0.1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def output(job_id: str, index: int, who: Principal | None):
        job = own_job(job_id, who)
        if not 0 <= index < len(job.outputs) or job.outputs[index] is None:
            raise BadRequest(404, f"job {job_id} has no finished image {index}")
        return job, job.outputs[index]

    @app.get("/api/jobs/{job_id}/images/{index}.png", tags=["jobs"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def job_image(job_id: str, index: int, who: Principal | None = Depends(caller)):
        job, out = output(job_id, index, who)
        return Response(out.png, media_type="image/png", headers={
            "Content-Disposition": f'inline; filename="{job.id}-{index}-seed{out.provenance["seed"]}.png"'})

    @app.get("/api/jobs/{job_id}/provenance/{index}.json", tags=["jobs"])
    def job_provenance(job_id: str, index: int, who: Principal | None = Depends(caller)):
        job, out = output(job_id, index, who)
        return JSONResponse(public_provenance(out.provenance), headers={
            "Content-Disposition": f'attachment; filename="{job.id}-{index}-seed{out.provenance["seed"]}.json"'})

    @app.get("/api/jobs/{job_id}/provenance.json", tags=["jobs"], summary="every image's provenance, by row")
    def job_provenance_all(job_id: str, who: Principal | None = Depends(caller)):
        job = own_job(job_id, who)
        rows = [{"row": r.label, "index": i, "provenance": public_provenance(o.provenance) if o else None}
                for i, (r, o) in enumerate(zip(job.rows, job.outputs))]
        data = {"format": "rdm-serve-job", "job": job.id, "kind": job.kind, "state": job.state,
                "request": job.summary, "images": rows}
        return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{job.id}.json"'})

    def contract():
        if app.openapi_schema is None:  # built once, with this service's limits (rdm.service.contract)
            app.openapi_schema = openapi_schema(app, config, engine.dim, usable_schedulers(), sorted(engine.adapters))
        return app.openapi_schema

    app.openapi = contract
    return app


__all__ = ["create_app", "Guard"]
