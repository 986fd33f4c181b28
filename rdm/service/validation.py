"""Requests and their bounds: every failure is a `BadRequest` with a status and a message that says what to do.

The shapes are pydantic models (unknown fields are refused, so a typo is not silently ignored); the
limits come from ServeConfig and are checked in `check_*`, which also turn JSON-level surprises (NaN,
Infinity, a non-object body) into clear 400s before anything is embedded or queued.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import NotFound, RDMError
from .config import ServeConfig

MAX_ID_CHARS = 1024  # an item id (a relative path in folder databases)
MAX_FILTER_VALUES = 64
MAX_FILTER_COLUMNS = 16
MAX_FILTER_CHARS = 256  # a column name or a value: a job keeps its filters and sends them with every event
MAX_WEIGHT = 1e6  # a database's weight (its share of the neighbours, relative to the others'), > 0
TEXT_PATTERN = r"^[^\x00]*[^\x00\s][^\x00]*$"  # a prompt: something besides white space, and no NUL


def _integral(value: Any) -> Any:
    """JSON's 20.0 is the integer 20 (JSON Schema says so); "20" and 20.5 are not integers."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


JsonInt = Annotated[int, BeforeValidator(_integral)]  # an integer as JSON means one, under strict validation


class BadRequest(Exception):
    """A request the service refuses; `status` is the HTTP status (4xx), `headers` e.g. Retry-After."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ErrorBody(BaseModel):
    error: str  # what was wrong, and what to do


def _error(description: str, headers: dict | None = None) -> dict:
    response: dict = {"model": ErrorBody, "description": description}
    if headers:
        response["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                               for name, text in headers.items()}
    return response


# one server-sent event of GET /api/jobs/{id}/events: its name (progress, then the final state) and the job's view
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string", "enum": ["progress", "done", "failed", "cancelled"]},
                            "data": {"type": "string", "contentMediaType": "application/json"}}}

# every route may answer these (the guard, the key check and the limits apply to all); documented once, for all
ERROR_RESPONSES = {
    400: _error("malformed request: not JSON, a lone surrogate, nesting or an integer too large, an undecodable image"),
    401: _error("a key is needed, or the key given is not valid", {"WWW-Authenticate": "Bearer"}),
    403: _error("the key lacks the scope; a cross-site browser request; a client or Host from another machine"),
    404: _error("no such database, item, job, upload or image (or one this key may not use)"),
    409: _error("the database cannot be used with this model (another CLIP), or is busy"),
    413: _error("the body, an image, or a list in it is larger than the service accepts"),
    422: _error("a field out of its range, or a rule between fields broken"),
    429: _error("the queue, or this key's share of it, is full", {"Retry-After": "seconds to wait"}),
    503: _error("shutting down, or the image decoding budget is full for now", {"Retry-After": "seconds to wait"}),
}


def refusal(e: RDMError) -> BadRequest:
    """A library error about a request as a 4xx: 404 when what it names is not there, else 422."""
    return BadRequest(404 if isinstance(e, NotFound) else 422, str(e))


class Strict(BaseModel):
    # unknown fields refused (a typo is not silently ignored), NaN / Infinity refused, and no coercion: "5" is not 5
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ItemRef(Strict):
    """An image already known to the service: an upload's id, or a database item by id."""

    upload: str | None = None  # id returned by POST /api/uploads
    database: str | None = None  # database name ...
    id: str | None = None  # ... and item id


Fraction = Annotated[float, Field(ge=0, le=1)]


class DatabaseChoice(Strict):
    name: str = Field(min_length=1, max_length=256)  # a served database (listed twice: the weights add up)
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT)  # share of the k neighbours, relative to the others


class AdapterChoice(Strict):
    name: str = Field(min_length=1, max_length=256)  # a served adapter (GET /api/info "adapters")
    weight: float = Field(1.0, ge=-4, le=4)  # its LoRA scale; 0 is the base model


# Bounds that do not depend on the service's settings are here, so the service and its OpenAPI schema say the same;
# those that do (k, steps, images, prompt length ...) are added to the schema by rdm.service.contract.
class NeighbourFields(Strict):
    """Control over the neighbours (rdm.sampling.conditioning.NeighbourControl); the defaults are plain retrieval."""

    diversity: Fraction = 0.0  # MMR over over-fetched candidates: 0 the nearest k
    dedup: float | None = Field(None, ge=-1, le=1)  # duplicate cosine threshold (None: 0.95 with diversity, else off)
    max_per: dict[str, Annotated[JsonInt, Field(ge=1)]] | None = Field(None, max_length=MAX_FILTER_COLUMNS)  # column
    # -> at most this many neighbours per value
    neighbour_weights: Literal["uniform", "database", "score"] = "uniform"
    negative_databases: list[DatabaseChoice] = Field(default_factory=list)  # guided away from
    negative_prompt: str | None = None
    content_subtract: float = Field(0.0, ge=0, le=2)  # neighbours minus this times the query, renormalised
    neighbour_window: list[Fraction] | None = Field(None, min_length=2, max_length=2)  # [start, end] fractions of
    # the steps the neighbours act in (either order; equal: in no step)


class AdapterFields(Strict):
    """LoRA adapters the service serves, mixed by weight (rdm.models.adapters); none: the base model."""

    adapters: list[AdapterChoice] = Field(default_factory=list)


class EditFields(Strict):
    """Image-to-image, inpainting, outpainting (rdm.sampling.editing) of an uploaded image or a database item."""

    init_image: ItemRef | None = None  # the image to restyle or edit; without a prompt or image, also the query
    strength: Fraction | None = None  # 0 returns it, 1 ignores it (default 0.8; 1 when outpainting)
    mask: ItemRef | None = None  # an uploaded mask: white (opaque) = redraw, black = keep
    mask_feather: float = Field(0.0, ge=0, le=256)  # a soft edge of about this many pixels inside the mask
    extend: list[Annotated[JsonInt, Field(ge=0, le=4096)]] | None = Field(None, min_length=4, max_length=4)  # outpainting:
    # [left, top, right, bottom] pixels added around the image
    aspect: str | None = Field(None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?:[0-9]+(\.[0-9]+)?$")  # outpainting:
    # grow the image to this "W:H"


class GenerateRequest(NeighbourFields, EditFields, AdapterFields):
    prompt: str | None = None  # text query ...
    image: ItemRef | None = None  # ... or an image query
    databases: list[DatabaseChoice] = Field(default_factory=list)  # empty: the query alone
    k: JsonInt | None = None  # neighbours per image (default: the model's k)
    where: dict[str, list[str] | str] | None = None  # metadata filters inside each search
    seed: JsonInt = 0  # image i of the request gets seed + i
    num_images: JsonInt = 1
    # sampler settings; None: the model's (rdm.models.format.SamplingDefaults, /api/info "defaults")
    steps: JsonInt | None = None
    guidance: float | None = None
    guidance_rescale: Fraction | None = None  # diffusers' guidance_rescale
    scheduler: str | None = None  # ddim, dpm++, euler ...
    eta: Fraction | None = None  # DDIM eta


class CompareRequest(NeighbourFields, EditFields, AdapterFields):
    prompt: str | None = None  # the query; without one, the init image's CLIP embedding
    rows: list[list[DatabaseChoice]]  # one row per entry; [] is a row without retrieval
    k: JsonInt | None = None
    where: dict[str, list[str] | str] | None = None
    seed: JsonInt = 0
    num_images: JsonInt = 1
    steps: JsonInt | None = None
    guidance: float | None = None
    guidance_rescale: Fraction | None = None
    scheduler: str | None = None
    eta: Fraction | None = None


class SearchRequest(Strict):
    database: str
    text: str | None = None
    image: ItemRef | None = None
    embedding: list[float] | None = None
    k: JsonInt = 10
    where: dict[str, list[str] | str] | None = None


class RemoveRequest(Strict):
    ids: list[str] = Field(default_factory=list)
    where: dict[str, list[str] | str] | None = None


class SessionRequest(Strict):
    key: str = Field(min_length=1, max_length=256)  # an API key (rdm keys add), or the one rdm serve printed


def collections_of(body: BaseModel) -> list[str]:
    """Every database a request names: its database, its choices (positive and negative, every compare row),
    and the databases of its item references (query, init image, mask)."""
    names: list[str] = []
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, DatabaseChoice):
            names.append(item.name)
        elif isinstance(item, ItemRef):
            if item.database is not None:
                names.append(item.database)
        elif isinstance(item, BaseModel):
            if isinstance(item, SearchRequest):
                names.append(item.database)
            stack.extend(getattr(item, f) for f in type(item).model_fields)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sorted(set(names))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


MAX_INT_DIGITS = 19  # an integer in a request fits in 64 bits


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def lone_surrogate(body: bytes) -> bool:
    """True when a JSON body escapes a UTF-16 surrogate that is not half of a pair ("\\ud800" alone), which no
    UTF-8 text can hold. Only bodies with such an escape are parsed here."""
    if b"\\ud" not in body.lower():
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False  # malformed: the endpoint's own parser says so
    return False


MAX_JSON_ITEMS = 4096  # the longest list a request may hold (an embedding of up to 4096 numbers): validation
# reports one error per bad element, so a 2 MB list of a million numbers cost 7.9 s and 1.2 GB before this bound


def longest_list(data: Any) -> int:
    """The length of the longest list anywhere in parsed JSON (iteratively: no recursion limit)."""
    longest, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            longest = max(longest, len(item))
            if longest > MAX_JSON_ITEMS:
                return longest
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return longest


def parse_json(body: bytes) -> Any:
    """Parse a request body as JSON whatever its Content-Type (clip-retrieval's client sends none); NaN, integers
    beyond 64 bits, lone surrogates and nesting deeper than Python's recursion refused (400)."""
    if not body:
        raise BadRequest(400, "empty request body: send a JSON object")
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_int=_parse_int)
    except UnicodeDecodeError:
        raise BadRequest(400, "request body is not UTF-8 JSON") from None
    except RecursionError:
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    if lone_surrogate(body):
        raise BadRequest(400, "malformed JSON: a string holds a lone UTF-16 surrogate, which is not text")
    return data


def model_from(cls: type[Strict], data: Any) -> Strict:
    """Validate parsed JSON into a request model; 422 naming each wrong field."""
    if not isinstance(data, dict):
        raise BadRequest(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise BadRequest(422, describe_validation(e.errors())) from None


def describe_validation(errors: list[dict]) -> str:
    """pydantic's error list -> 'field: problem; field: problem'."""
    parts = []
    for err in errors[:8]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(422, f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_float(name: str, value: float, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(422, f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def check_text(name: str, text: str, config: ServeConfig) -> str:
    if not text.strip():
        raise BadRequest(422, f"empty {name}: give some text")
    if len(text) > config.max_prompt_chars:
        raise BadRequest(422, f"{name} is {len(text)} characters; at most {config.max_prompt_chars}")
    if "\x00" in text:
        raise BadRequest(422, f"{name} contains a NUL character")
    return text


def check_id(item_id: str) -> str:
    """An item id is only ever compared with stored ids; refuse what no id can be."""
    if not item_id or len(item_id) > MAX_ID_CHARS or any(ord(c) < 32 for c in item_id):
        raise BadRequest(404, "no such item (ids are non-empty, printable and at most "
                              f"{MAX_ID_CHARS} characters)")
    return item_id


HIDDEN_COLUMNS = ("path",)  # server file paths stay on the server: never returned, never filtered on


def check_where(where: dict | None, hidden: bool = False) -> dict[str, list[str]] | None:
    """{"style": "neon"} or {"style": ["neon", "flat"]} -> column -> values; None when empty. A hidden column is
    refused (filtering on it would tell a caller which server paths exist) unless `hidden` (an operator's takedown)."""
    if not where:
        return None
    if len(where) > MAX_FILTER_COLUMNS:
        raise BadRequest(422, f"filters on {len(where)} columns; at most {MAX_FILTER_COLUMNS}")
    out = {}
    for col, values in where.items():
        longest = max([len(col)] + [len(v) for v in ([values] if isinstance(values, str) else values)
                                    if isinstance(v, str)])
        if longest > MAX_FILTER_CHARS:
            raise BadRequest(422, f"filter {col[:40]!r}: a column name or value of {longest} characters; at most "
                                  f"{MAX_FILTER_CHARS}")
        if "=" in col:
            raise BadRequest(422, f"filter {col[:40]!r}: a column name holds no '='")
        if col in HIDDEN_COLUMNS and not hidden:
            raise BadRequest(422, f"filter {col!r}: the column {col!r} stays on the server and cannot be filtered on")
        values = [values] if isinstance(values, str) else list(values)
        if not col or not 1 <= len(values) <= MAX_FILTER_VALUES:
            raise BadRequest(422, f"filter {col!r}: give a column and 1 to {MAX_FILTER_VALUES} values")
        out[col] = values
    return out


def check_embedding(values: Any, dim: int) -> np.ndarray:
    """A query vector from JSON: dim finite numbers, not all zero -> (1, dim) float32 unit vector."""
    if not isinstance(values, list) or (values and isinstance(values[0], list)):
        if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
            values = values[0]  # [[...]]: one query
        else:
            raise BadRequest(400, f"embedding_input must be a list of {dim} numbers")
    if len(values) != dim:
        raise BadRequest(400, f"embedding_input has {len(values)} numbers; the database's CLIP makes {dim}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise BadRequest(400, "embedding_input must hold numbers only")
    vec = np.asarray(values, np.float64)
    if not np.isfinite(vec).all():
        raise BadRequest(400, "embedding_input holds NaN or infinite values")
    norm = float(np.linalg.norm(vec))
    if norm == 0.0 or not math.isfinite(norm):
        raise BadRequest(400, "embedding_input is the zero vector (or too large to normalise)")
    return (vec / norm).astype(np.float32)[None, :]
