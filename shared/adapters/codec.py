"""Byte encodings shared by the adapters: events as log fields, state as msgpack."""

from __future__ import annotations

from datetime import datetime
from typing import Any, get_args

import msgspec

from shared.domain.events import SCHEMA_VERSION, Event
from shared.domain.state import SessionState
from shared.domain.upcast import upcast as domain_upcast

json_encode = msgspec.json.Encoder().encode
_CURRENT_SCHEMA = str(SCHEMA_VERSION).encode()
_EVENT_TYPES: dict[bytes, tuple[type, msgspec.json.Decoder]] = {
    cls.__name__.encode(): (
        cls,
        msgspec.json.Decoder(next(f.type for f in msgspec.structs.fields(cls) if f.name == "data")),
    )
    for cls in get_args(Event)
}
_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(SessionState)


def member(tenant: str, session_id: str) -> str:
    """A session as a member of the per-partition indexes (idle, schedules): `tenant/session id`."""
    return f"{tenant}/{session_id}"


def split_member(member: str) -> tuple[str, str]:
    """(tenant, session id) of an index member."""
    tenant, _, session_id = member.partition("/")
    return tenant, session_id


def event_fields(event: Event) -> tuple[str, str, str, bytes]:
    """(type, id, occurred_at, data JSON): what the log stores of an event; the version is the entry's id."""
    at = json_encode(event.occurred_at)[1:-1].decode()
    return type(event).__name__, event.id, at, json_encode(event.data)


def log_fields(event: Event) -> dict[bytes, bytes]:
    """The log entry's fields of an event as it is stored today (schema current)."""
    kind, event_id, at, data = event_fields(event)
    return {b"t": kind.encode(), b"i": event_id.encode(), b"a": at.encode(), b"s": _CURRENT_SCHEMA, b"d": data}


def event_json(version: int, fields: dict[bytes, bytes]) -> bytes:
    """The wire JSON of a logged event, assembled without decoding its data."""
    data = upcast(fields[b"t"], int(fields.get(b"s", b"1")), fields[b"d"])
    return b'{"type":"%s","id":"%s","version":%d,"occurred_at":"%s","data":%s}' % (
        fields[b"t"],
        fields[b"i"],
        version,
        fields[b"a"],
        data,
    )


def decode_event(version: int, fields: dict[bytes, bytes]) -> Event:
    """A logged event as its Struct: only `data` goes through the JSON decoder (replay and rebuild spend most of
    their time here)."""
    kind = fields[b"t"]
    cls, decoder = _EVENT_TYPES[kind]
    data = fields[b"d"]
    if (schema := fields.get(b"s")) != _CURRENT_SCHEMA:
        data = upcast(kind, int(schema or b"1"), data)
    at = datetime.fromisoformat(fields[b"a"].decode())
    return cls(id=fields[b"i"].decode(), version=version, occurred_at=at, data=decoder.decode(data))


def upcast(event_type: bytes, schema: int, data: bytes) -> bytes:
    """A payload's JSON in today's shape; today's payloads pass through untouched (no decode)."""
    if schema == SCHEMA_VERSION:
        return data
    return json_encode(domain_upcast(event_type.decode(), schema, msgspec.json.decode(data)))


def encode_state(state: SessionState) -> bytes:
    return _state_encoder.encode(state)


def decode_state(raw: bytes) -> SessionState:
    if b"tool_call_ids" in raw:  # possibly written before open_tool_calls (cheap to test, rare to be true)
        return _from_legacy(_legacy_state_decoder.decode(raw))
    return _state_decoder.decode(raw)


class _StateWithToolCallIds(SessionState, kw_only=True):
    """Read models written before `open_tool_calls` kept every call id in `tool_call_ids`."""

    tool_call_ids: frozenset[str] = frozenset()


_legacy_state_decoder = msgspec.msgpack.Decoder(_StateWithToolCallIds)


def _from_legacy(old: _StateWithToolCallIds) -> SessionState:
    """All of an old state's calls count as open: a result may still answer any of them, as it could before.
    `parley rebuild` replaces such states with exact ones."""
    fields = {f: getattr(old, f) for f in SessionState.__struct_fields__}
    fields["open_tool_calls"] = old.open_tool_calls | old.tool_call_ids
    return SessionState(**fields)


def pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))
