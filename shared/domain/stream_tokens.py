"""Stream tokens: short-lived, single-session, read-only credentials for the event streams.

A browser's `EventSource` cannot send an `Authorization` header, and an API key must not sit in a web page. The
page's backend asks `POST /sessions/{id}/stream-tokens` for a token (with its key) and hands the token to the
page, which opens `…/events?token=…` or `…/chats/{job}/stream?token=…`. A token names its tenant, its one session
and when it expires, signed with HMAC-SHA256 under the deployment's secret; it opens nothing else.

Pure: the caller gives the secret and the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec

__all__ = ["StreamGrant", "sign", "verify"]


class StreamGrant(msgspec.Struct, array_like=True, frozen=True):
    tenant: str
    session_id: str
    expires: int
    """Unix seconds."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StreamGrant).decode


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, grant: StreamGrant) -> str:
    payload = _encode(grant)
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify(secret: bytes, token: str, now: float) -> StreamGrant | None:
    """The grant a token carries if it is ours, intact and not expired; else None."""
    payload_b64, dot, mac_b64 = token.partition(".")
    if not dot or len(token) > 1024:
        return None
    try:
        payload, mac = _unb64(payload_b64), _unb64(mac_b64)
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        return None
    try:
        grant = _decode(payload)
    except msgspec.DecodeError:
        return None
    return grant if grant.expires > now else None
