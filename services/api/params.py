"""What several controllers parse the same way: paging, ids, `Idempotency-Key`, `If-Match`, and the error
responses every endpoint documents."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter

from shared.app.service import Idempotency
from shared.domain.errors import Invalid, NotFound, VersionConflict
from shared.domain.ids import parse_uuid
from shared.domain.wire import ErrorBody

__all__ = [
    "AtVersion",
    "IdempotencyKey",
    "IfMatch",
    "Limit",
    "Offset",
    "etag",
    "errors",
    "expected_version",
    "idempotency",
    "json_list",
    "json_response",
    "parse_job_id",
    "parse_schedule_id",
    "parse_message_id",
    "parse_session_id",
    "wants_event_stream",
]

Limit = Annotated[int, Parameter(ge=1, le=1000, description="Items per page (1..1000).")]
Offset = Annotated[int, Parameter(ge=0, le=1_000_000_000, description="Items to skip (0..10⁹).")]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
        description="1 to 255 printable ASCII characters. Retrying with the same key and body within 24 h answers the first "
        "result and writes nothing.",
    ),
]
AtVersion = Annotated[
    int | None,
    Parameter(
        ge=1,
        le=2**63 - 1,
        required=False,
        description="Time travel: the state right after this event version (folded from the log).",
    ),
]
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        required=False,
        max_length=64,
        description='The ETag you hold (`"7"`, or `*`): one, not a list; a stale or malformed one answers 412 and '
        "changes nothing (one longer than 64 characters: 422).",
    ),
]
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")
_ETAG = re.compile(r'(?:W/)?"([0-9]{1,19})"|([0-9]{1,19})')
"""An entity tag of ours: a version in quotes (weak or not), or bare, ASCII digits only."""


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """The error answers an endpoint documents: 401, 422 and 503 always, and `codes`."""
    return {c: ResponseSpec(data_container=ErrorBody, description="Error") for c in (401, 422, 503, *codes)}


def _parse_id(raw: str, what: str) -> str:
    """A UUID path segment, normalised; anything else names nothing here (404, as an unknown id does)."""
    parsed = parse_uuid(raw)
    if parsed is None:
        raise NotFound(f"{what} {raw} not found")
    return parsed


def parse_session_id(raw: str) -> str:
    return _parse_id(raw, "session")


def parse_message_id(raw: str) -> str:
    return _parse_id(raw, "message")


def parse_job_id(raw: str) -> str:
    return _parse_id(raw, "chat")


def parse_schedule_id(raw: str) -> str:
    return _parse_id(raw, "schedule")


def etag(version: int) -> str:
    return f'"{version}"'


def expected_version(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    m = _ETAG.fullmatch(if_match.strip())
    if m is None:
        raise VersionConflict("If-Match is not an ETag of this session (a version in quotes)", {"header": "If-Match"})
    return int(m.group(1) or m.group(2))


async def idempotency(request: Request[Any, Any, Any], key: str | None) -> Idempotency | None:
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise Invalid("Idempotency-Key must be 1 to 255 printable ASCII characters", {"header": "Idempotency-Key"})
    query = request.url.query  # DELETE and DELETE ?purge=true are different requests
    path = request.url.path.lower()  # ids are read case-insensitively (an uppercase UUID names the same session)
    target = f"{path}?{query}" if query else path
    return Idempotency.of(key, request.method, target, await request.body())


def json_response(
    body: bytes | msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> Response[Any]:
    """An answer of JSON: bytes already encoded (read models hold wire JSON: it is never decoded on the way out),
    or a wire Struct a use case returned, encoded here once."""
    content = body if isinstance(body, bytes) else _encode(body)
    return Response(content=content, status_code=status, headers=headers, media_type=MediaType.JSON)


_encode = msgspec.json.Encoder().encode


def json_list(items: list[bytes], **fields: bytes) -> Response[Any]:
    """`{"items": [...], **fields}` from pre-encoded items and field values."""
    extra = b"".join(b',"%s":%s' % (k.encode(), v) for k, v in fields.items())
    return json_response(b'{"items":[' + b",".join(items) + b"]" + extra + b"}")


def wants_event_stream(accept: str | None) -> bool:
    """`Accept` prefers `text/event-stream` to JSON (RFC 9110: media ranges are case-insensitive, `q=0` means "not
    this", the higher `q` wins; a tie goes to the stream, as a browser's EventSource sends no other)."""
    stream = json = 0.0
    for part in (accept or "").split(","):
        media, *params = part.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "text/event-stream":
            stream = max(stream, q)
        elif media in ("application/json", "application/*", "*/*"):
            json = max(json, q)
    return stream > 0 and stream >= json
