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
Access: ClipClient sends no key, so its databases must be opened to anonymous callers (rdm serve
--anonymous NAME); a client that sends 'Authorization: Bearer KEY' gets what its key may search.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

from typing import Annotated, Literal

import annotated_types

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RDMError
from .access import Principal, caller, require
from .images import fetch_url
from .validation import (
    HIDDEN_COLUMNS,
    BadRequest,
    JsonInt,
    check_embedding,
    check_int,
    check_text,
    model_from,
    parse_json,
    refusal,
)

DEDUP_THRESHOLD = 0.94  # clip-retrieval's get_non_uniques: items closer than this to a kept one are dropped

router = APIRouter(tags=["clip-retrieval compatible"])

class KnnRequest(BaseModel):
    """clip_back's /knn-service body as ClipClient sends it; fields it does not know are ignored, as clip_back does.
    One query is used, in clip_back's precedence: text, image, image_url, embedding_input; every field given is
    checked, used or not."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    text: str | None = None
    image: str | None = None  # base64 bytes of an image
    image_url: str | None = Field(None, max_length=2048)  # fetched only with rdm serve --allow-urls
    embedding_input: list[float] | None = None
    indice_name: str | None = Field(None, max_length=256)  # default: the first database the caller may search
    modality: Literal["image"] = "image"  # rdm databases hold image embeddings only ("text" is refused)
    num_images: JsonInt = 40
    num_result_ids: JsonInt | None = None
    deduplicate: bool = False
    use_safety_model: bool = False  # accepted, no effect (no safety model here)
    use_violence_detector: bool = False  # accepted, no effect
    use_mclip: Literal[False] = False  # no multilingual CLIP here
    aesthetic_score: JsonInt | Literal[""] | None = None  # accepted, no effect
    aesthetic_weight: float | Literal[""] | None = None  # accepted, no effect


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[str | Annotated[JsonInt, annotated_types.Interval(ge=-2**63, le=2**63 - 1)]] = Field(max_length=4096)
    indice_name: str | None = Field(None, max_length=256)


def _body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


KNN_BODY = _body(KnnRequest)  # the schemas themselves are put in by rdm.service.contract


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
async def knn_service(request: Request, who: Principal | None = Depends(caller)):
    require(who, "search")
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    if data.get("modality") == "text":
        raise BadRequest(400, "modality 'text': rdm databases hold image embeddings only; use 'image' (text queries "
                              "are matched against the images)")
    if data.get("use_mclip"):
        raise BadRequest(400, "use_mclip: this service has no multilingual CLIP; send the text as it is")
    data = model_from(KnnRequest, data).model_dump(exclude_unset=True)  # every field given is checked, used or not
    return await _run_sync(request, _knn, request, data, who)


def _knn(request: Request, data: dict, who: Principal) -> list[dict]:
    engine, config = request.app.state.engine, request.app.state.config
    names = [n for n in engine.registry.names() if who.sees(n)]
    name = data.get("indice_name") or (names[0] if names else None)
    if name is None:
        raise BadRequest(404, "this service serves no database this key may search")
    if not isinstance(name, str):
        raise BadRequest(400, "indice_name must be a string")
    require(who, "search", [name])
    db = engine.database(name)
    num_images = check_int("num_images", data.get("num_images", 40), 1, config.max_search_k)
    num_ids = data.get("num_result_ids") or num_images
    num_ids = check_int("num_result_ids", num_ids, 1, config.max_search_k)
    if data.get("embedding_input") is not None:
        check_embedding(data["embedding_input"], db.dim)  # checked even when a text or an image comes first
    query = _query(request, data, db.dim)
    try:
        result = db.search(query, k=max(num_ids, num_images))
    except RDMError as e:
        raise refusal(e) from None
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
def indices_list(request: Request, who: Principal | None = Depends(caller)) -> list[str]:
    who = require(who, "search")
    return [n for n in request.app.state.engine.registry.names() if who.sees(n)]


@router.post("/metadata", summary="clip-retrieval: metadata of items by id", openapi_extra=_body(MetadataRequest))
async def metadata(request: Request, who: Principal | None = Depends(caller)):
    require(who, "search")
    data = parse_json(await request.body())
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
        raise BadRequest(400, "send {\"ids\": [...], \"indice_name\": NAME}")
    model_from(MetadataRequest, data)
    return await _run_sync(request, _metadata_of, request, data, who)


def _metadata_of(request: Request, data: dict, who: Principal) -> list[dict]:
    engine, config = request.app.state.engine, request.app.state.config
    ids = data["ids"]
    if len(ids) > config.max_search_k:
        raise BadRequest(422, f"at most {config.max_search_k} ids per request")
    name = data.get("indice_name") or next((n for n in engine.registry.names() if who.sees(n)), "")
    require(who, "search", [name])
    db = engine.database(name)
    out = []
    for item_id in ids:
        found = db.lookup(str(item_id)) if isinstance(item_id, (str, int)) else None
        out.append({"id": item_id, "metadata": _metadata(found[0]) if found else None})
    return out


async def _run_sync(request: Request, fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
