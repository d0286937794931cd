"""What litestar lets through and Parley refuses, checked before a handler runs (its `before_request` hook).

- A body must be JSON: a route that takes a body answers 415 `unsupported_media_type` to any other
  `Content-Type` (`application/json` with or without parameters, or any `application/*+json`), so a form,
  XML or an image never reaches the decoder, and nothing is written.
- Integer query parameters are decimal digits, without leading zeros: litestar's lenient conversion reads `1e3` as
  1000 and `1.0` as 1, which a proxy or cache in front may read otherwise (and `01` it refused, naming a `str`).
- A query parameter is given at most once: litestar reads the last of several, a filter read by hand the first,
  and a proxy in front may read either (the same parser differential as duplicate JSON keys).

(Duplicate JSON keys are refused where bodies are decoded, in `services.api.body`.)
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

from litestar import Request
from litestar.handlers import HTTPRouteHandler
from litestar.params import ParameterKwarg

from shared.domain.errors import DomainError

__all__ = ["UnsupportedMediaType", "before_request"]

_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)")
_JSON = re.compile(r"application/(?:[\w.+-]+\+)?json", re.ASCII | re.IGNORECASE)


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"
    status = 415


class BadQuery(DomainError):
    code = "validation_failed"
    status = 422


class _Rules:
    __slots__ = ("takes_body", "integers")

    def __init__(self, handler: HTTPRouteHandler) -> None:
        params = handler.parsed_fn_signature.parameters
        self.takes_body = "data" in params
        self.integers = tuple(
            name
            for name, fd in params.items()
            if _is_int(fd.annotation)
            and (fd.kwarg_definition is None or isinstance(fd.kwarg_definition, ParameterKwarg))
            and not getattr(fd.kwarg_definition, "header", None)
            and not getattr(fd.kwarg_definition, "cookie", None)
        )  # (path parameters are ids, strings: never among these)


_rules: dict[int, _Rules] = {}


async def before_request(request: Request[Any, Any, Any]) -> None:
    handler = request.route_handler
    rules = _rules.get(id(handler))
    if rules is None:
        rules = _rules[id(handler)] = _Rules(handler)  # type: ignore[arg-type]
    if rules.takes_body:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip()
        if not _JSON.fullmatch(media) and _has_body(request):
            raise UnsupportedMediaType(
                f"the body must be JSON (Content-Type: application/json), not {media or 'untyped'}",
                {"header": "Content-Type"},
            )
    if not request.scope.get("query_string"):
        return
    query = request.query_params
    for name in query.keys():
        if len(query.getall(name)) > 1:
            raise BadQuery(
                "the request does not match the schema",
                [{"message": "given more than once", "key": name, "source": "query"}],
            )
    for name in rules.integers:
        for value in query.getall(name, ()):
            if not _DECIMAL.fullmatch(value):
                raise BadQuery(
                    "the request does not match the schema",
                    [
                        {
                            "message": f"Expected a decimal integer, got {value[:32]!r}",
                            "key": name,
                            "source": "query",
                        }
                    ],
                )


def _has_body(request: Request[Any, Any, Any]) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or "transfer-encoding" in request.headers


def _is_int(annotation: Any) -> bool:
    if annotation is int:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return int in get_args(annotation)
    return False
