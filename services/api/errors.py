"""One error body for every 4xx and 5xx: {"error": {status, code, message, details?}}."""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from services.api.body import InvalidJson, SchemaMismatch
from shared.domain.context import TokenBudgetExceeded
from shared.domain.errors import (
    ChatInProgress,
    ChatNotActive,
    ChatTimeout,
    ChatUnanswered,
    Contention,
    DeletedAtVersion,
    DomainError,
    HasForks,
    IdempotencyKeyReused,
    Invalid,
    InvalidImport,
    NotFound,
    ProjectionLagging,
    QuotaExceeded,
    RateLimited,
    SessionExists,
    TickTaken,
    VersionConflict,
)
from shared.domain.wire import ErrorBody, ErrorDetail
from shared.observability import metrics
from shared.supervise import TRANSIENT, pool_exhausted

__all__ = ["DOMAIN_STATUS", "EXCEPTION_HANDLERS", "UNANSWERED_STATUS", "error_response", "status_of"]

log = logging.getLogger("parley.api")

DOMAIN_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Invalid: 422,
    VersionConflict: 412,
    IdempotencyKeyReused: 422,
    ProjectionLagging: 503,
    Contention: 409,
    InvalidJson: 400,
    SchemaMismatch: 422,
    ChatInProgress: 409,
    ChatNotActive: 409,
    TickTaken: 409,
    DeletedAtVersion: 409,
    HasForks: 409,
    TokenBudgetExceeded: 422,
    ChatTimeout: 504,
    SessionExists: 409,
    InvalidImport: 422,
    RateLimited: 429,
    QuotaExceeded: 429,
}
"""The HTTP status of each domain error (an error with its own `status` attribute keeps it)."""

UNANSWERED_STATUS = {"token_budget_exceeded": 422, "cancelled": 409, "session_deleted": 409}
"""A chat that ended without an answer, by its job's error code; any other (the model's) is a 502."""


def status_of(exc: DomainError) -> int:
    if isinstance(exc, ChatUnanswered):
        return UNANSWERED_STATUS.get(exc.code, 502)
    status = getattr(exc, "status", None)
    return status or next((DOMAIN_STATUS[c] for c in type(exc).__mro__ if c in DOMAIN_STATUS), 400)


HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "version_conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, details: object = None, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(
        ErrorBody(ErrorDetail(status=status, code=code, message=message, details=details)),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def on_domain_error(_: Request, exc: DomainError) -> Response[ErrorBody]:
    status = status_of(exc)
    retry = getattr(exc, "retry_after", None) or (1 if status == 503 else None)
    headers = {"Retry-After": str(retry)} if retry else None
    return error_response(status, exc.code, exc.message, exc.details, headers)


def on_http_error(_: Request, exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if isinstance(exc, ValidationException) and _no_body(exc.extra):
        return error_response(400, "invalid_json", "the request body is empty: this endpoint takes a JSON body")
    if isinstance(exc, ValidationException) and exc.extra:  # query, path and header parameters
        return error_response(422, "validation_failed", "the request does not match the schema", _details(exc.extra))
    headers = dict(exc.headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    message = exc.detail if status != 413 else "the request body is larger than allowed"
    return error_response(status, HTTP_CODES.get(status, "error"), str(message), None, headers or None)


def on_store_error(_: Request, exc: Exception) -> Response[ErrorBody]:
    if pool_exhausted(exc):  # every Redis connection of this process is busy: shed the request
        metrics.REJECTED.labels("overloaded", "").inc()
        return error_response(503, "overloaded", "the server is at capacity; retry shortly", None, {"Retry-After": "1"})
    metrics.redis_error(exc)
    log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(
        503, "store_unavailable", "the store is unavailable; retry shortly", None, {"Retry-After": "1"}
    )


def on_unexpected(_: Request, exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def _no_body(extra: object) -> bool:
    """litestar's answer to an empty body where a handler takes one: its `data` argument is missing."""
    return isinstance(extra, list) and any(
        isinstance(item, dict) and item.get("key") == "data" and item.get("source") == "body" for item in extra
    )


def _details(extra: object) -> object:
    """litestar's validation details, without echoing request values back."""
    if isinstance(extra, list):
        return [
            {k: v for k, v in item.items() if k in ("message", "key", "source")} if isinstance(item, dict) else item
            for item in extra
        ]
    return extra


EXCEPTION_HANDLERS = {
    DomainError: on_domain_error,
    HTTPException: on_http_error,
    **{t: on_store_error for t in TRANSIENT},
    Exception: on_unexpected,
}
