"""Webhooks, decided purely: which events go out, the wire types, signing, retry backoff and delivery ids.

A subscription's deliveries are driven from the outbox, which `project` fills (exactly once per event, because
`APPLY` is version-fenced); the deliverer only moves a subscription's cursor through it. Signing follows Standard
Webhooks (the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers), so its receiver libraries verify
Parley's deliveries as they are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "SECRET_PREFIX",
    "ChangeType",
    "WEBHOOK_EVENT_TYPES",
    "Delivery",
    "DeliveryList",
    "OutboxEntry",
    "Outcome",
    "Replay",
    "Subscription",
    "WebhookChange",
    "WebhookChangeData",
    "WebhookChangePage",
    "Webhook",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookList",
    "WebhookPatch",
    "WebhookPayload",
    "SecretRotation",
    "address_refused",
    "backoff_s",
    "before",
    "delivery_id",
    "new_secret",
    "parse_position",
    "secret_key",
    "sign",
    "signature",
    "verify",
]

WEBHOOK_EVENT_TYPES = ("SessionCreated", "SessionDeleted", "ChatCompleted", "ChatFailed", "ChatCancelled")
"""The events that enter the outbox: a session's life and each chat's end. Not `MessageAdded`, the bulk of any
log: a chat's answer is in `ChatCompleted`, and the outbox stays a small fraction of the logs."""
EventType = Literal["SessionCreated", "SessionDeleted", "ChatCompleted", "ChatFailed", "ChatCancelled"]
SECRET_PREFIX = "whsec_"
_B64 = "[A-Za-z0-9+/]"
Secret = Annotated[
    str,
    Meta(
        pattern=f"^whsec_(?:(?:{_B64}{{4}}){{5,20}}(?:{_B64}{{4}}|{_B64}{{3}}=|{_B64}{{2}}==)|(?:{_B64}{{4}}){{21}}{_B64}{{2}}==)$"
    ),
]
"""`whsec_` and the base64 (padded) of 16 to 64 random bytes (Standard Webhooks' format: the HMAC key is those
bytes). The pattern is exact: a secret it lets in always decodes, or no delivery could be signed."""
Url = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://[!-~]+$")]
"""http(s) and printable ASCII only (an international host name as its punycode): one meaning in every regex
dialect, so the document and the decoder agree."""
Position = Annotated[str, Meta(pattern=r"^[0-9]{1,19}(-[0-9]{1,19})?$")]
"""An outbox position: `<ms>-<seq>` (a delivery's `position`), or `<ms>` (from that time, ms since the epoch)."""
EventTypes = Annotated[list[EventType], Meta(min_length=1, max_length=len(WEBHOOK_EVENT_TYPES))]


class _Body(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request bodies: unknown fields are an error, not silently dropped."""


class WebhookCreate(_Body):
    url: Url
    """Where deliveries are POSTed (http or https; not a loopback or private address unless the deployment allows)."""
    event_types: EventTypes
    secret: Secret | None = None
    """The signing secret; absent: one is made and answered once, on create."""


class WebhookPatch(_Body):
    url: Url | None = None
    event_types: EventTypes | None = None
    active: bool | None = None
    """False: deliveries pause (the cursor stays where it was; true resumes from there)."""


class SecretRotation(_Body):
    secret: Secret | None = None
    """The new signing secret; absent: one is made (and answered this once)."""
    previous_valid_s: Annotated[int, Meta(ge=0, le=7 * 86_400)] = 86_400
    """How long deliveries are signed with the old secret too, so receivers can switch without a failed check
    (0: at once)."""


class Replay(_Body):
    from_: Position = msgspec.field(name="from")
    """Deliver again every outbox entry at or after this position (what the outbox still holds)."""


class Webhook(Struct, kw_only=True):
    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(Webhook, kw_only=True):
    """A subscription as created, or as a secret rotation left it: with its signing secret."""

    secret: str
    """Shown only in this answer: keep it to verify signatures."""


class WebhookList(Struct):
    items: list[Webhook]


class Subscription(Struct, kw_only=True):
    """A subscription as stored: the resource, its secret, and where its cursor starts."""

    id: str
    tenant: str
    url: str
    event_types: list[str]
    secret: str
    active: bool = True
    created_at: datetime
    updated_at: datetime
    previous_secret: str | None = None
    """The secret before the last rotation: deliveries are signed with it too until `previous_until`."""
    previous_until: datetime | None = None

    def secrets(self, now: datetime) -> list[str]:
        """What a delivery at `now` is signed with: the secret, and the previous one while it is still valid."""
        if self.previous_secret is not None and self.previous_until is not None and now < self.previous_until:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def resource(self) -> Webhook:
        return Webhook(**{f: getattr(self, f) for f in Webhook.__struct_fields__})


Outcome = Literal["succeeded", "retrying", "failed", "skipped"]


class Delivery(Struct, kw_only=True):
    """One attempt to deliver one outbox entry (the deliveries list, newest first)."""

    id: str
    """The `webhook-id` header: the same for every attempt (and replay) of this event to this subscription."""
    event_id: str
    event_type: str
    session_id: str
    position: str
    """The entry's outbox position (`POST /webhooks/{id}/replay` takes it)."""
    attempt: int
    outcome: Outcome
    """skipped: the event is gone (its session was purged); nothing was sent. A URL refused at the attempt (its
    host now resolves to a private address) is an attempt that failed: retried, since DNS may change back."""
    status_code: int | None = None
    error: str | None = None
    duration_ms: int
    at: datetime


class DeliveryList(Struct):
    items: list[Delivery]


class WebhookChangeData(Struct, kw_only=True, omit_defaults=True):
    webhook_id: str
    url: str | None = None
    event_types: list[str] | None = None
    active: bool | None = None
    from_: str | None = msgspec.field(name="from", default=None)
    """A replay's position."""
    previous_until: datetime | None = None
    """A secret rotation's: until when the previous secret signs too."""


ChangeType = Literal["WebhookCreated", "WebhookUpdated", "WebhookDeleted", "WebhookReplayed", "WebhookSecretRotated"]


class WebhookChange(Struct, kw_only=True):
    """A change of one of the tenant's subscriptions, as events are shaped (never its secret)."""

    type: ChangeType
    id: str
    occurred_at: datetime
    data: WebhookChangeData


class WebhookChangePage(Struct):
    """`next` is the cursor to pass as `after`; null on the last page."""

    items: list[WebhookChange]
    next: str | None


class OutboxEntry(Struct, kw_only=True, frozen=True):
    """An event of a webhook type, as projection put it into its partition's outbox."""

    partition: int
    position: str
    """The stream entry id (`<ms>-<seq>`)."""
    tenant: str
    session_id: str
    version: int
    event_type: str
    event_id: str


class WebhookPayload(Struct, kw_only=True):
    """The body of a delivery."""

    type: str
    session_id: str
    data: msgspec.Raw
    """The event as `GET /sessions/{id}/events` shows it (its `id`, `version`, `occurred_at`, `data`)."""


_NOT_GLOBAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("fec0::/10"))
"""Not globally routable, yet `is_global` on Python 3.11 says they are: IETF protocol assignments (IANA), and
IPv6's deprecated site-local addresses (RFC 3879)."""


def address_refused(address: str) -> bool:
    """An address deliveries must not reach unless the deployment allows private ones: loopback, private,
    link-local, shared (CGNAT), multicast, reserved, unspecified — anything not globally routable, an IPv4 address
    written as IPv6 (mapped, or 6to4) as the IPv4 address it carries."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (`fe80::1%eth0`) is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    elif isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        ip = ip.sixtofour
    if any(ip in network for network in _NOT_GLOBAL):
        return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key a secret stands for (the bytes after `whsec_`)."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as e:
        raise ValueError("a webhook secret is whsec_ and base64") from e


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `<id>.<timestamp>.<body>`."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(secret_key(secret), signed, hashlib.sha256).digest()).decode()


def signature(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<sig>` per secret, space-separated (Standard Webhooks)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def verify(secret: str, msg_id: str, timestamp: int, body: bytes, signature_header: str) -> bool:
    """What a receiver does: any of the space-separated `v1,<sig>` matches (rotation sends several)."""
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signature_header.split())


def delivery_id(subscription_id: str, event_id: str) -> str:
    """Stable per (subscription, event): a redelivery after a crash, a retry and a replay all carry it."""
    return "msg_" + hashlib.sha256(f"{subscription_id}/{event_id}".encode()).hexdigest()[:32]


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait after failed attempt `attempt` (1-based): base, 2×base, 4×base… at most `cap_s`."""
    return float(min(cap_s, base_s * 2 ** min(attempt - 1, 30)))


MAX_SEQ = 2**64 - 1


def before(position: str) -> str:
    """The position right before `position`: a cursor there delivers `position` next (a replay's start)."""
    ms, seq = parse_position(position)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0-0"


def parse_position(text: str) -> tuple[int, int]:
    """`<ms>-<seq>` or `<ms>` (sequence 0) as (ms, seq)."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
