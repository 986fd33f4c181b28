"""The OpenAPI contract of one running service: the request models' shapes (pydantic) tightened with this service's
limits and the rules between fields, so that a request the schema accepts is one the service accepts.

FastAPI writes the shapes; this module adds what depends on the running service (ServeConfig's limits, the model's
embedding size, its usable schedulers, the adapters served) and what pydantic cannot say (exactly one query; the edit
fields only with an image to edit; hidden columns not filterable). Every 4xx the service answers is documented
for every route (rdm.service.validation.ERROR_RESPONSES). schemathesis checks the result against the running
service (tests/service/test_serve_contract.py).

What no schema can say, and the service still checks: that a database, item, upload, job or adapter exists (404);
that an image's bytes decode (400); that a filter matches something (404); model-specific rules (409/422).
"""

from __future__ import annotations


from fastapi.openapi.utils import get_openapi

from .clip_retrieval_compat import KnnRequest, MetadataRequest
from .validation import (
    MAX_FILTER_CHARS,
    MAX_FILTER_COLUMNS,
    MAX_FILTER_VALUES,
    MAX_ID_CHARS,
    HIDDEN_COLUMNS,
    TEXT_PATTERN,
)

INT32 = 2**31 - 1


def _nullable(schema: dict, inner: dict) -> None:
    """Tighten the non-null branch of pydantic's `anyOf [T, null]` (or the schema itself when not nullable)."""
    branches = schema.get("anyOf")
    target = next((b for b in branches if b.get("type") != "null"), None) if branches else schema
    if target is not None:
        target.update(inner)


def _text(max_chars: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": TEXT_PATTERN}


def _where() -> dict:
    value = {"type": "string", "maxLength": MAX_FILTER_CHARS}
    return {"type": "object", "maxProperties": MAX_FILTER_COLUMNS,
            "propertyNames": {"minLength": 1, "maxLength": MAX_FILTER_CHARS, "pattern": "^[^=]+$",
                              "not": {"enum": list(HIDDEN_COLUMNS)}},
            "additionalProperties": {"anyOf": [{"type": "array", "items": value, "minItems": 1,
                                                "maxItems": MAX_FILTER_VALUES}, value]}}


def _sampling(props: dict, config, schedulers: list[str]) -> None:
    _nullable(props["k"], {"minimum": 0, "maximum": config.max_k})
    props["num_images"].update({"minimum": 1, "maximum": config.max_images})
    props["seed"].update({"minimum": 0, "maximum": INT32 - config.max_images})
    _nullable(props["steps"], {"minimum": 1, "maximum": config.max_steps})
    _nullable(props["guidance"], {"minimum": -config.max_guidance, "maximum": config.max_guidance})
    _nullable(props["scheduler"], {"enum": schedulers})
    _nullable(props["where"], _where())


def _neighbour_fields(props: dict, config) -> None:
    _nullable(props["negative_prompt"], _text(config.max_prompt_chars))

def _edit_fields() -> dict:
    """The rule: strength, mask, extend and aspect only with an init_image (extend not all 0, and the aspect not the
    image's own, are said by the service once the image is found)."""
    edits = [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in ("strength", "mask", "extend",
                                                                                      "aspect")]
    return {"if": {"anyOf": edits}, "then": {"required": ["init_image"],
                                             "properties": {"init_image": {"type": "object"}}}}


def _one_of(fields: list[str], required: bool = True) -> dict:
    """Exactly one (required) or at most one of `fields` present and not null."""
    given = [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]
    pairs = [{"allOf": [given[i], given[j]]} for i in range(len(fields)) for j in range(i + 1, len(fields))]
    rule: dict = {"not": {"anyOf": pairs}}
    return {"allOf": [rule, {"anyOf": given}]} if required else rule


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node) -> None:
    """pydantic leaves a bound it cannot place (on a type with a before-validator, e.g. JsonInt) as "ge"/"le": JSON
    Schema's names for them, in place."""
    if isinstance(node, dict):
        if "type" in node:
            for short, name in _BOUNDS.items():
                if short in node:
                    node[name] = node.pop(short)
        for value in node.values():
            _json_schema_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _json_schema_bounds(value)


def openapi_schema(app, config, dim: int, schedulers: list[str], adapters: list[str]) -> dict:
    """The service's OpenAPI document, tightened as this module's docstring says."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes,
                         description=__doc__.split("\n\n")[0])
    comps = schema["components"]["schemas"]

    ref = comps["ItemRef"]
    ref["properties"]["upload"]["anyOf"][0].update({"minLength": 1, "maxLength": 64})
    for f in ("database", "id"):
        _nullable(ref["properties"][f], {"minLength": 1, "maxLength": MAX_ID_CHARS})
    given = {f: {"required": [f], "properties": {f: {"type": "string"}}} for f in ("upload", "database", "id")}
    absent = {f: {"properties": {f: {"type": "null"}}} for f in ("upload", "database", "id")}
    ref["oneOf"] = [{"allOf": [given["upload"], absent["database"], absent["id"]]},
                    {"allOf": [given["database"], given["id"], absent["upload"]]}]

    comps["AdapterChoice"]["properties"]["name"].update({"enum": adapters} if adapters else {"not": {}})

    gen = comps["GenerateRequest"]
    _sampling(gen["properties"], config, schedulers)
    _neighbour_fields(gen["properties"], config)
    _nullable(gen["properties"]["prompt"], _text(config.max_prompt_chars))
    gen["allOf"] = [_edit_fields(),
                    # a query: the prompt or an image, one of them; or neither when an image is edited (its own)
                    {"anyOf": [_one_of(["prompt", "image"]),
                               {"allOf": [{"required": ["init_image"], "properties": {"init_image": {"type": "object"}}},
                                          _one_of(["prompt", "image"], required=False)]}]}]

    cmp_ = comps["CompareRequest"]
    _sampling(cmp_["properties"], config, schedulers)
    _neighbour_fields(cmp_["properties"], config)
    _nullable(cmp_["properties"]["prompt"], _text(config.max_prompt_chars))
    cmp_["properties"]["rows"].update({"minItems": 1, "maxItems": config.max_compare_rows})
    cmp_["allOf"] = [_edit_fields(),
                     {"anyOf": [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                                {"required": ["init_image"], "properties": {"init_image": {"type": "object"}}}]}]

    search = comps["SearchRequest"]
    props = search["properties"]
    props["database"].update({"minLength": 1, "maxLength": 256})
    _nullable(props["text"], _text(config.max_prompt_chars))
    _nullable(props["embedding"], {"minItems": dim, "maxItems": dim,
                                   "items": {"type": "number", "minimum": -1e100, "maximum": 1e100},
                                   "contains": {"type": "number", "not": {"const": 0}}})
    props["k"].update({"minimum": 1, "maximum": config.max_search_k})
    _nullable(props["where"], _where())
    search.update(_one_of(["text", "image", "embedding"]))

    remove = comps["RemoveRequest"]
    remove["properties"]["ids"].update({"maxItems": 4096, "items": {"type": "string", "minLength": 1,
                                                                    "maxLength": MAX_ID_CHARS}})
    # a takedown may filter on the hidden path column (the operator's): only the sizes are bounded
    where = _where()
    where["propertyNames"].pop("not")
    _nullable(remove["properties"]["where"], where)
    remove["anyOf"] = [{"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
                       {"required": ["where"], "properties": {"where": {"type": "object", "minProperties": 1}}}]

    for model in (KnnRequest, MetadataRequest):
        comps[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    comps["MetadataRequest"]["properties"]["ids"]["maxItems"] = config.max_search_k
    knn = comps["KnnRequest"]
    kp = knn["properties"]
    kp["num_images"].update({"minimum": 1, "maximum": config.max_search_k})
    _nullable(kp["num_result_ids"], {"minimum": 1, "maximum": config.max_search_k})
    _nullable(kp["text"], {"maxLength": config.max_prompt_chars, "pattern": "^$|" + TEXT_PATTERN})  # "": no text
    _nullable(kp["image"], {"maxLength": config.max_upload_bytes * 4 // 3 + 4})
    _nullable(kp["embedding_input"], {"minItems": dim, "maxItems": dim,
                                      "items": {"type": "number", "minimum": -1e100, "maximum": 1e100},
                                      "contains": {"type": "number", "not": {"const": 0}}})
    # a query: clip_back's order is text (not empty), image, image_url, embedding_input; one at least
    knn["anyOf"] = [{"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}}] + [
        {"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in ("image", "image_url",
                                                                                  "embedding_input")]
    _json_schema_bounds(comps)
    return schema


__all__ = ["openapi_schema"]
