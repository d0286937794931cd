"""The OpenAPI document, made exact: what litestar generates from the handlers, finished by one table.

litestar documents a default 400 body (`{status_code, detail, extra}`) Parley never sends, knows nothing of the
statuses the guard, the HTTP protocol or the store answer (401, 408, 415, 429, 503…), of event streams, or of
response headers. `finish` rewrites the generated document once at start-up, so that a generated client (or a
fuzzer) finds every status an operation can answer, each with Parley's one error body and its codes, the
`text/event-stream` answers beside the JSON ones, the `ETag` / `Location` / `Retry-After` / `RateLimit` headers,
`security: []` on the probes, and parameters no looser than what the API accepts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import msgspec

__all__ = ["finish", "structs_of"]

ERROR = {"$ref": "#/components/schemas/ErrorBody"}
OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIErrorBody"}

CODES: dict[int, dict[str, str]] = {
    400: {"invalid_json": "the body is not JSON", "bad_request": "the request is not valid HTTP"},
    401: {"unauthorized": "no key, or an unknown or revoked key"},
    404: {
        "not_found": "no such session (or job, or webhook) for this tenant",
        "version_not_found": "the session never had that version",
    },
    409: {
        "write_contention": "too many concurrent writers on one session; retry",
        "chat_in_progress": "another chat runs and the multitask policy is `reject`",
        "chat_not_active": "the chat already ended",
        "cancelled": "the chat was cancelled",
        "session_deleted": "the session was deleted while the chat ran",
    },
    412: {"version_conflict": "`If-Match` is not the session's version"},
    413: {"payload_too_large": "the body is over `PARLEY_MAX_BODY_BYTES`"},
    415: {"unsupported_media_type": "the body is not sent as `application/json`"},
    422: {
        "validation_failed": "the body, a parameter or a header does not match the schema, or breaks a rule",
        "idempotency_key_reused": "the Idempotency-Key was used with another request",
        "token_budget_exceeded": "the prompt cannot fit the session's token budget",
        "webhook_url_refused": "the webhook URL does not resolve, or names a loopback or private address",
    },
    429: {
        "rate_limited": "the tenant is over its request rate, its concurrent chats or its open streams",
        "quota_exceeded": "the tenant used its chat tokens of the day",
    },
    502: {
        "model_unavailable": "the model's server failed",
        "model_rate_limited": "the model's server refused (429)",
        "model_timeout": "the model did not answer in time",
        "model_error": "the model answered an error",
    },
    503: {
        "store_unavailable": "Redis does not answer (within `PARLEY_REDIS_TIMEOUT_S`)",
        "overloaded": "the process is at its in-flight bound, or out of Redis connections",
        "projection_lagging": "the read model did not catch up within `PARLEY_READ_TIMEOUT_S`",
    },
    504: {"chat_timeout": "no answer within `PARLEY_CHAT_WAIT_S` (the job goes on)"},
}
"""Every error code the API answers, by status (README: the error table)."""
OPENAI_CODES: dict[int, dict[str, str]] = {
    400: {
        "unsupported_value": "a field Parley cannot honour (`n` other than 1)",
        "token_budget_exceeded": "the prompt cannot fit the session's token budget",
    },
    422: {"unsupported_content": "a content part Parley does not store (audio, file)"},
}
"""The OpenAI-compatible endpoint answers these too (its errors add OpenAI's `type` and `param`)."""

HEADERS = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}},
    "RateLimit-Policy": {
        "description": 'The tenant\'s request quota (draft-ietf-httpapi-ratelimit-headers): `"tenant";q=<requests>;w=<seconds>`.',
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'What is left of it: `"tenant";r=<remaining>;t=<seconds until whole again>`.',
        "schema": {"type": "string"},
    },
    "ETag": {"description": "The session's version, quoted: send it back in `If-Match`.", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`: how to authenticate.", "schema": {"type": "string"}},
    "Location": {"description": "The URL of what was created.", "schema": {"type": "string"}},
}

INT64_MAX = 2**63 - 1
SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One server-sent event (README: the event names and what each `data` holds).",
            "properties": {
                "id": {"type": "string"},
                "event": {"type": "string"},
                "data": {"type": "string", "description": "JSON, or `[DONE]` at the end of a chat's stream."},
                "retry": {"type": "integer"},
            },
        }
    }
}
NO_MORE = {
    "description": "Nothing follows the `Last-Event-ID` given (the stream ended): an EventSource stops reconnecting."
}
PROBES = {"/health", "/ready"}
WEBHOOK_URLS = {"/webhooks", "/webhooks/{webhook_id}"}
"""Where a webhook URL is given (and may be refused)."""
DEPRECATED = {"/sessions": {"offset"}}
"""Query parameters still served but marked deprecated (litestar's `Parameter` cannot say so)."""
SESSION_WRITES = re.compile(r"^/sessions(/\{session_id\}(/messages)?)?$")


def finish(doc: dict[str, Any], types: Iterable[type]) -> dict[str, Any]:
    """Make the generated document exact (in place; answers it). `types`: the msgspec Structs of the API, whose
    schemas msgspec itself writes (the decoder's own rules: bounds, `additionalProperties: false`, lengths)."""
    components = doc.setdefault("components", {})
    components.setdefault("headers", {}).update(copy.deepcopy(HEADERS))
    _exact_schemas(components.setdefault("schemas", {}), types)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                _finish_operation(path, method, op)
    return doc


def _finish_operation(path: str, method: str, op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op["responses"]
    responses.pop("400", None)  # litestar's own ValidationException body: never sent
    for p in op.get("parameters", ()):
        _tighten(p)
        if p["in"] == "query" and p["name"] in DEPRECATED.get(path, ()):
            p["deprecated"] = True
    if path in PROBES:
        op["security"] = []
        if path == "/ready":
            responses["503"] = _error(
                503, {"not_ready": "Redis, the projector or a part of this process is not available"}, ERROR
            )
        return
    openai = path.endswith("/chat/completions") or path.endswith("/models")
    body = ERROR if not openai else OPENAI_ERROR
    has_body = "requestBody" in op
    has_params = has_body or any(p["in"] in ("query", "header") for p in op.get("parameters", ()))
    statuses = {400, 401, 429, 503}
    if "{session_id}" in path or "{webhook_id}" in path:
        statuses.add(404)
    if has_params:
        statuses.add(422)
    if has_body:
        statuses |= {413, 415}
    if method in ("post", "put", "patch", "delete") and SESSION_WRITES.match(path):
        statuses.add(409)
    if method in ("put", "patch", "delete") and path == "/sessions/{session_id}":
        statuses.add(412)
    if path.endswith("/chat") or (openai and method == "post"):
        statuses |= {409, 502, 504}
    if path.endswith("/cancel"):
        statuses.add(409)
    for status in sorted(statuses):
        codes = dict(CODES[status])
        if status == 400 and not has_body:
            codes.pop("invalid_json")
        if status == 404 and "version" not in {p["name"] for p in op.get("parameters", ())}:
            codes.pop("version_not_found")
        if status == 422 and not path.endswith("/chat"):
            codes.pop("token_budget_exceeded")
        if status == 422 and not (path in WEBHOOK_URLS and method in ("post", "patch")):
            codes.pop("webhook_url_refused")
        if openai and status in OPENAI_CODES:
            codes.update(OPENAI_CODES[status])
        responses[str(status)] = _error(status, codes, body)
    for status, response in responses.items():
        if status.startswith("2"):
            headers = response.setdefault("headers", {})
            headers.update({h: {"$ref": f"#/components/headers/{h}"} for h in ("RateLimit-Policy", "RateLimit")})
    if "204" in responses:  # no content, by definition (litestar writes a `null` JSON body for `Response[None]`)
        responses["204"].pop("content", None)
    _success_headers(path, method, responses)
    _streams(path, method, responses)


def _error(status: int, codes: dict[str, str], schema: dict[str, str]) -> dict[str, Any]:
    lines = "; ".join(f"`{code}`: {when}" for code, when in codes.items())
    response: dict[str, Any] = {"description": f"Error ({lines}).", "content": {"application/json": {"schema": schema}}}
    if status == 401:
        return {**response, "headers": {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        if status == 429:
            response["headers"].update(
                {h: {"$ref": f"#/components/headers/{h}"} for h in ("RateLimit-Policy", "RateLimit")}
            )
    return response


def _success_headers(path: str, method: str, responses: dict[str, Any]) -> None:
    def add(status: str, *names: str) -> None:
        if status in responses:
            responses[status].setdefault("headers", {}).update(
                {n: {"$ref": f"#/components/headers/{n}"} for n in names}
            )

    if (path == "/sessions" or path.endswith("/fork")) and method == "post":
        add("201", "ETag", "Location")
    if path == "/webhooks" and method == "post":
        add("201", "Location")
    if path == "/sessions/{session_id}" and method in ("get", "put", "patch"):
        add("200", "ETag")
    if (path.endswith("/chat") or path.endswith("/compact")) and method == "post":
        add("202", "Location")
    if path.endswith("/schedules") and method == "post":
        add("201", "ETag", "Location")
    if "/schedules" in path and method in ("get", "patch"):
        add("200", "ETag")
    if "/schedules/" in path and method == "delete":
        add("204", "ETag")


def _streams(path: str, method: str, responses: dict[str, Any]) -> None:
    """Answers that are (or may be) `text/event-stream`."""
    ok = responses.get("200")
    if ok is None:
        return
    if path.endswith("/chats/{job_id}/stream"):
        ok["content"] = copy.deepcopy(SSE)
        ok["description"] = "The job's events (OpenAI-style chunks, the usage, then `[DONE]`)."
        responses["204"] = copy.deepcopy(NO_MORE)
    elif path.endswith("/events"):
        ok.setdefault("content", {}).update(copy.deepcopy(SSE))
        ok["description"] = "A page of the log, or with `Accept: text/event-stream` the log followed live."
        responses["204"] = copy.deepcopy(NO_MORE)
    elif method == "post" and (path.endswith("/chat") or path.endswith("/chat/completions")):
        ok.setdefault("content", {}).update(copy.deepcopy(SSE))
        ok["description"] = "JSON, or `text/event-stream` with `stream: true`."


def _tighten(param: dict[str, Any]) -> None:
    """A header or query parameter is absent or a value, never null: `T | None` documents as `T`. Integer bounds
    are integers (litestar writes them as floats, and 2**63 - 1 as a float is 2**63, which the API refuses)."""
    schema = param.get("schema") or {}
    variants = schema.get("oneOf")
    if param["in"] in ("header", "query") and isinstance(variants, list):
        kinds = [v for v in variants if v.get("type") != "null"]
        if len(kinds) == 1 and len(kinds) < len(variants):
            schema = {**{k: v for k, v in schema.items() if k != "oneOf"}, **kinds[0]}
    if param["in"] in ("header", "query") and None in schema.get("enum", ()):
        # `Literal[…] | None`: absent, never null
        schema["enum"] = [v for v in schema["enum"] if v is not None]
        if isinstance(schema.get("type"), list):
            kinds = [t for t in schema["type"] if t != "null"]
            schema["type"] = kinds[0] if len(kinds) == 1 else kinds
    if schema.get("type") == "integer":
        for bound in ("minimum", "maximum"):
            if isinstance(schema.get(bound), float):
                schema[bound] = INT64_MAX if schema[bound] == float(INT64_MAX) else int(schema[bound])
    param["schema"] = schema


# -- component schemas ------------------------------------------------------------------------------------------
def _exact_schemas(schemas: dict[str, Any], types: Iterable[type]) -> None:
    """Replace litestar's schema of each Struct with msgspec's own (litestar drops `minimum: 0` on optional fields,
    `minItems` inside unions and `additionalProperties: false`), then state the rules msgspec cannot: which fields
    a message of each role takes, and that a retention holds at least one rule."""
    named = {t.__name__: t for t in types if t.__name__ in schemas}
    _, generated = msgspec.json.schema_components(list(named.values()), ref_template="#/components/schemas/{name}")
    for name, schema in generated.items():
        schema.pop("title", None)
        schemas[name] = schema
    schemas["JsonValue"] = JSON_VALUE
    for schema in generated.values():
        _json_values(schema)
    for name in ("MessageCreate", "OpenAIMessage"):
        if name in schemas:
            schemas[name] = _by_role(schemas[name])
    if "OpenAIMessage" in schemas:  # text and image parts are stored, refusal parts dropped; the others answer 422
        for variant in schemas["OpenAIMessage"]["oneOf"]:
            content = variant["properties"].get("content")
            if content is not None:
                variant["properties"]["content"] = _text_and_image_parts(content)
    if "Retention" in schemas:  # `Retention.__post_init__`: at least one of the two, not null
        schemas["Retention"]["anyOf"] = [
            {"required": [field], "properties": {field: {"type": "integer"}}}
            for field in ("idle_days", "keep_messages")
        ]
    request = schemas.get("ChatCompletionRequest")
    if request is not None:  # one session holds one conversation: any other `n` answers 400 `unsupported_value`
        request["properties"]["n"] = {"anyOf": [{"const": 1}, {"type": "null"}], "default": None}


JSON_VALUE: dict[str, Any] = {
    "description": "Any JSON value whose numbers lie within [-2**63, 2**64 - 1] (what the store can keep; others answer 422).",
    "anyOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "string"},
        {"type": "number", "minimum": -(2**63), "maximum": 2**64 - 1},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
    ],
}


def _json_values(node: Any) -> None:
    """Free-form values (`metadata`, tool `parameters`, an `Any` field…) are JSON values within the store's numbers."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
            node["additionalProperties"] = {"$ref": "#/components/schemas/JsonValue"}
        for name, sub in (node.get("properties") or {}).items():
            if _unconstrained(sub):
                node["properties"][name] = {"anyOf": [{"$ref": "#/components/schemas/JsonValue"}], **sub}
        if _unconstrained(node.get("items")) or (node.get("type") == "array" and "items" not in node):
            node["items"] = {"$ref": "#/components/schemas/JsonValue"}
        for value in node.values():
            _json_values(value)
    elif isinstance(node, list):
        for value in node:
            _json_values(value)


def _unconstrained(schema: Any) -> bool:
    """msgspec's schema of an `Any` field: nothing but a default or a description."""
    return isinstance(schema, dict) and not set(schema) - {"default", "description"}


def _by_role(schema: dict[str, Any]) -> dict[str, Any]:
    """A message as one schema per role (as OpenAI's own document has them): `content` is required, except on an
    assistant message that carries `tool_calls`; only a `tool` message has (and needs) `tool_call_id`; only an
    assistant message has `tool_calls`. An OpenAI message, which ignores unknown fields, names the two on the other
    roles as null (or no calls), so that a client does not take them for fields it may send anything in."""
    props: dict[str, Any] = schema["properties"]
    roles = props["role"]["enum"]
    content = copy.deepcopy(props["content"])
    content["anyOf"] = [v for v in content["anyOf"] if v.get("type") != "null"]
    content.pop("default", None)
    common = {k: v for k, v in props.items() if k not in ("role", "content", "tool_call_id", "tool_calls")}
    lenient = schema.get("additionalProperties", True) is not False  # an OpenAI message: unknown fields ignored
    variants = []
    for role in roles:
        p: dict[str, Any] = {"role": {"const": role}, **copy.deepcopy(common)}
        required = ["role", "content"]
        variant: dict[str, Any] = {
            "type": "object",
            "properties": p,
            "additionalProperties": schema.get("additionalProperties", True),
        }
        if role == "assistant":
            p["content"] = copy.deepcopy(props["content"])
            p["tool_calls"] = copy.deepcopy(props["tool_calls"])
            p["tool_calls"]["anyOf"] = [v for v in p["tool_calls"]["anyOf"] if v.get("type") != "null"]
            required = ["role"]
            variant["anyOf"] = [
                {"required": ["content"], "properties": {"content": copy.deepcopy(content)}},
                {
                    "required": ["tool_calls"],
                    "properties": {"tool_calls": {**p["tool_calls"]["anyOf"][0], "minItems": 1}},
                },
            ]
        else:
            p["content"] = copy.deepcopy(content)
        if role == "tool":
            p["tool_call_id"] = {k: v for k, v in copy.deepcopy(props["tool_call_id"]).items() if k != "default"}
            p["tool_call_id"]["anyOf"] = [v for v in p["tool_call_id"]["anyOf"] if v.get("type") != "null"]
            required.append("tool_call_id")
        if lenient and role != "tool":  # the type has the field on every role: any value but null is refused (422)
            p["tool_call_id"] = {"type": "null"}
        if lenient and role != "assistant":  # likewise: none, or no calls
            p["tool_calls"] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
        variant["required"] = required
        variants.append(variant)
    return {"oneOf": variants}


def _text_and_image_parts(content: dict[str, Any]) -> dict[str, Any]:
    kept = {f"#/components/schemas/{n}" for n in ("OpenAITextPart", "OpenAIImagePart", "RefusalPart")}
    for variant in content.get("anyOf", ()):
        items = variant.get("items") if variant.get("type") == "array" else None
        if items and "anyOf" in items:
            items["anyOf"] = [i for i in items["anyOf"] if i.get("$ref") in kept]
            mapping = items.get("discriminator", {}).get("mapping")
            if mapping:
                items["discriminator"]["mapping"] = {k: v for k, v in mapping.items() if v in kept}
    return content


def structs_of(*modules: Any) -> list[type]:
    """The msgspec Structs the modules define: the API's types, for `finish`."""
    return [
        v
        for m in modules
        for v in vars(m).values()
        if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__module__ == m.__name__
    ]
