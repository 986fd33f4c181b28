"""clip-retrieval's search protocol (clip_retrieval/clip_back.py), so its ClipClient queries rdm databases unchanged.

    POST /knn-service   {"text" | "image" (base64) | "image_url" | "embedding_input", "indice_name",
                         "modality", "num_images", "num_result_ids", "deduplicate", ...}
                        -> [{"id", "similarity", "caption", "url", other metadata columns}, ...]
    GET  /indices-list  -> ["name", ...]
    POST /metadata      {"ids", "indice_name"} -> [{"id", "metadata": {...}}, ...]

Differences, all deliberate: `id` is the rdm item id (a string; clip-retrieval's are row numbers, which
change here after a takedown); `url` points at this service's image endpoint (the re-encoded image,
never the file on disk); rdm databases hold image embeddings only, so modality "text" (search the
caption index) is refused; there is no safety, violence or aesthetic model, so those options are
accepted and have no effect (a database is curated at build time and by takedowns); use_mclip is
refused. The body is parsed as JSON whatever its Content-Type, as Flask's get_json(force=True) does.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Request

from ..errors import RDMError
from .images import fetch_url
from .validation import HIDDEN_COLUMNS, BadRequest, check_embedding, check_int, check_text, parse_json

DEDUP_THRESHOLD = 0.94  # clip-retrieval's get_non_uniques: items closer than this to a kept one are dropped

router = APIRouter(tags=["clip-retrieval compatible"])

KNN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "text": {"type": "string", "nullable": True}, "image": {"type": "string", "nullable": True,
                                                                  "description": "base64 image"},
        "image_url": {"type": "string", "nullable": True}, "embedding_input": {"type": "array", "nullable": True,
                                                                               "items": {"type": "number"}},
        "indice_name": {"type": "string"}, "modality": {"type": "string", "enum": ["image", "text"]},
        "num_images": {"type": "integer"}, "num_result_ids": {"type": "integer"},
        "deduplicate": {"type": "boolean"}}}}}}}


def _query(request: Request, data: dict, dim: int) -> np.ndarray:
    """clip-retrieval's precedence: text, then image, then image_url, then embedding_input -> (1, D)."""
    engine, config = request.app.state.engine, request.app.state.config
    text, image, url, emb = (data.get(k) for k in ("text", "image", "image_url", "embedding_input"))
    if text is not None and text != "":
        if not isinstance(text, str):
            raise BadRequest(400, "text must be a string")
        return engine.embed_text(check_text("text", text, config))
    if image is not None or url is not None:
        if image is not None:
            if not isinstance(image, str):
                raise BadRequest(400, "image must be a base64 string")
            if len(image) > config.max_upload_bytes * 4 // 3 + 4:
                raise BadRequest(413, f"image is larger than {config.max_upload_bytes} bytes")
            try:
                raw = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(400, "image is not valid base64") from None
        else:
            raw = fetch_url(url, config)
        return engine.embed_image_bytes(raw)[0]
    if emb is not None:
        return check_embedding(emb, dim)
    raise BadRequest(400, "must fill one of text, image, image_url and embedding_input")


def _metadata(hit: dict) -> dict:
    return {k: v for k, v in hit.items() if k not in HIDDEN_COLUMNS + ("score", "row", "database")}


def _deduplicate(vectors: np.ndarray) -> list[int]:
    """Positions kept: each item unless it is within DEDUP_THRESHOLD cosine of an earlier kept one."""
    kept: list[int] = []
    for i, v in enumerate(vectors):
        if not kept or float(np.max(vectors[kept] @ v)) < DEDUP_THRESHOLD:
            kept.append(i)
    return kept


@router.post("/knn-service", openapi_extra=KNN_BODY, summary="clip-retrieval knn search")
async def knn_service(request: Request):
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    return await _run_sync(request, _knn, request, data)


def _knn(request: Request, data: dict) -> list[dict]:
    engine, config = request.app.state.engine, request.app.state.config
    names = engine.registry.names()
    name = data.get("indice_name") or (names[0] if names else None)
    if name is None:
        raise BadRequest(404, "this service serves no database")
    db = engine.database(name)
    modality = data.get("modality", "image")
    if modality != "image":
        raise BadRequest(400, f"modality {modality!r}: rdm databases hold image embeddings only; use 'image' "
                              "(text queries are matched against the images)")
    if data.get("use_mclip"):
        raise BadRequest(400, "use_mclip: this service has no multilingual CLIP; send the text as it is")
    num_images = check_int("num_images", data.get("num_images", 40), 1, config.max_search_k)
    num_ids = data.get("num_result_ids") or num_images
    num_ids = check_int("num_result_ids", num_ids, 1, config.max_search_k)
    query = _query(request, data, db.dim)
    try:
        result = db.search(query, k=max(num_ids, num_images))
    except RDMError as e:
        raise BadRequest(422, str(e)) from None
    hits = result.hits(0)
    if data.get("deduplicate", False) and hits:
        kept = _deduplicate(result.embeddings()[0][:len(hits)])
        hits = [hits[i] for i in kept]
    base = str(request.base_url).rstrip("/")
    out = []
    for hit in hits[:num_images]:
        url = f"{base}/api/databases/{quote(name, safe='')}/image?id={quote(hit['id'], safe='')}&size=full"
        out.append({**_metadata(hit), "id": hit["id"], "similarity": float(hit["score"]), "url": url})
    return out


@router.get("/indices-list", summary="clip-retrieval: names of the databases served")
def indices_list(request: Request) -> list[str]:
    return request.app.state.engine.registry.names()


@router.post("/metadata", summary="clip-retrieval: metadata of items by id")
async def metadata(request: Request):
    data = parse_json(await request.body())
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
        raise BadRequest(400, "send {\"ids\": [...], \"indice_name\": NAME}")
    return await _run_sync(request, _metadata_of, request, data)


def _metadata_of(request: Request, data: dict) -> list[dict]:
    engine, config = request.app.state.engine, request.app.state.config
    ids = data["ids"]
    if len(ids) > config.max_search_k:
        raise BadRequest(422, f"at most {config.max_search_k} ids per request")
    db = engine.database(data.get("indice_name") or "")
    out = []
    for item_id in ids:
        found = db.lookup(str(item_id)) if isinstance(item_id, (str, int)) else None
        out.append({"id": item_id, "metadata": _metadata(found[0]) if found else None})
    return out


async def _run_sync(request: Request, fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
