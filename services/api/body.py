"""Strict request bodies: raw bytes → msgspec Struct in one pass, with no type coercion.

litestar decodes bodies to Python objects and then converts them leniently (so "100"
would become 100). Every write body goes through this DTO instead: msgspec decodes the
bytes straight into the wire type, strictly, and the OpenAPI schema is the wire type's.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any, Generic, TypeVar

import msgspec
from litestar.dto import AbstractDTO, DTOFieldDefinition
from litestar.typing import FieldDefinition

from shared.domain.errors import DomainError

T = TypeVar("T")


class InvalidJson(DomainError):
    code = "invalid_json"


class SchemaMismatch(DomainError):
    code = "validation_failed"


class StrictBody(AbstractDTO[T], Generic[T]):
    _decoders: dict[type, msgspec.json.Decoder] = {}

    def decode_bytes(self, value: bytes) -> T:
        decoder = self._decoders.get(self.model_type)
        if decoder is None:
            decoder = self._decoders[self.model_type] = msgspec.json.Decoder(self.model_type)
        try:
            try:
                decoded = decoder.decode(value)
            except msgspec.ValidationError as e:
                _check_syntax(value)  # a typed decode can fail on a field before it reaches a syntax error
                raise SchemaMismatch(
                    "the request body does not match the schema", [{"message": str(e), "source": "body"}]
                ) from e
            _storable(decoded)
            _unique_keys(value)
            return decoded
        except RecursionError as e:  # from the decode, or the syntax check after a typed field failed first
            raise SchemaMismatch("the request body is nested too deeply", [{"source": "body"}]) from e
        except msgspec.DecodeError as e:
            raise InvalidJson(f"the request body is not valid JSON: {e}") from e

    def decode_builtins(self, value: dict[str, Any]) -> T:
        try:
            return msgspec.convert(value, self.model_type, strict=True)
        except msgspec.ValidationError as e:
            raise SchemaMismatch(
                "the request body does not match the schema", [{"message": str(e), "source": "body"}]
            ) from e

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        """Nothing to build: decoding is one msgspec call."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False


def _check_syntax(value: bytes) -> None:
    try:
        msgspec.json.decode(value)
    except msgspec.DecodeError as e:
        raise InvalidJson(f"the request body is not valid JSON: {e}") from e


def _unique_keys(value: bytes) -> None:
    """Refuse an object with a key twice: msgspec keeps the last, a proxy or a validator in front may check the
    first, and that difference is a known way to smuggle a value past it. (The body is valid JSON by now.)"""
    if value.count(b":") < 2:  # every key is followed by a colon: with fewer than two keys nothing can repeat
        return
    json.loads(value, object_pairs_hook=_pairs_without_repeats)


def _pairs_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise SchemaMismatch(
            f"the request body has the key {repeated!r} more than once in one object",
            [{"message": f"duplicate key {repeated!r}", "source": "body"}],
        )
    return out


def _storable(value: object) -> None:
    """What the API accepts must also fit the store's encodings (msgpack state): a 2**70 in `metadata` is valid JSON
    but would stop the projector, so numbers beyond [-2**63, 2**64 - 1] are refused here — floats too, because
    JSON Schema (and so the OpenAPI document, and clients generated from it) cannot tell 1e20 from 10**20."""
    for number in _numbers(msgspec.to_builtins(value)):
        if not LOWEST <= number <= HIGHEST:
            raise SchemaMismatch(
                "the request body holds a number outside [-2**63, 2**64 - 1]",
                [{"message": f"{number!r} is out of range", "source": "body"}],
            )


LOWEST, HIGHEST = -(2**63), 2**64 - 1


def _numbers(value: Any) -> Iterator[int | float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
