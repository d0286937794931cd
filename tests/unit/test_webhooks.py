"""Webhooks' pure parts: signing (Standard Webhooks' own test vector, and a receiver's check), the address guard,
which events enter the outbox, backoff, positions."""

from __future__ import annotations

import asyncio

import pytest

from shared.adapters.webhook_sender import HttpWebhookSender
from shared.domain import projection
from shared.domain.commands import CreateSession, DeleteSession, Stamp, decide
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.webhooks import (
    WEBHOOK_EVENT_TYPES,
    address_refused,
    backoff_s,
    before,
    delivery_id,
    new_secret,
    sign,
    verify,
)
from shared.domain.wire import SessionCreate


def test_the_signature_is_standard_webhooks():
    """The Standard Webhooks specification's example: a receiver using its libraries verifies Parley's deliveries."""
    secret, msg_id, ts, body = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_receiver_verifies_what_was_signed_and_nothing_else():
    secret, other = new_secret(), new_secret()
    header = sign(secret, "msg_1", 1_700_000_000, b'{"a":1}')
    assert verify(secret, "msg_1", 1_700_000_000, b'{"a":1}', header)
    assert verify(secret, "msg_1", 1_700_000_000, b'{"a":1}', f"v1,bm90IGl0 {header}")  # one of several (rotation)
    assert not verify(other, "msg_1", 1_700_000_000, b'{"a":1}', header)
    assert not verify(secret, "msg_2", 1_700_000_000, b'{"a":1}', header)
    assert not verify(secret, "msg_1", 1_700_000_001, b'{"a":1}', header)
    assert not verify(secret, "msg_1", 1_700_000_000, b'{"a":2}', header)


def test_delivery_ids_are_stable_per_subscription_and_event():
    assert delivery_id("s1", "e1") == delivery_id("s1", "e1")
    assert len({delivery_id("s1", "e1"), delivery_id("s2", "e1"), delivery_id("s1", "e2")}) == 3


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared (CGNAT)
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::",
        "ff02::1",
        "192.0.0.8",  # IETF protocol assignments
        "fec0::1",  # IPv6 site-local (deprecated, never globally routed)
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_private_addresses_are_refused(address: str):
    assert address_refused(address)


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::1"],  # 6to4 of a public one
)
def test_public_addresses_pass(address: str):
    assert not address_refused(address)


def test_the_sender_refuses_private_hosts_unless_allowed():
    async def main() -> None:
        strict, lax = HttpWebhookSender(1.0, False), HttpWebhookSender(1.0, True)
        try:
            assert "private" in (await strict.vet("http://127.0.0.1:9/hook") or "")
            assert "private" in (await strict.vet("http://localhost:9/hook") or "")
            assert "private" in (await strict.vet("http://[::1]:9/hook") or "")
            assert await strict.vet("ftp://example.com/") is not None
            assert await strict.vet("http://user:pw@127.0.0.1/") is not None
            for port in (0, 65536, 99999, -1):  # 0 would have connected to the scheme's own port
                assert "port" in (await lax.vet(f"https://93.184.216.34:{port}/h") or ""), port
            assert await lax.vet("http://127.0.0.1:9/hook") is None
            sent = await strict.send("http://127.0.0.1:9/hook", {}, b"{}")
            assert sent.status_code is None and "private" in (sent.error or "")
        finally:
            await strict.aclose()
            await lax.aclose()

    asyncio.run(main())


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_s(a, 1.0, 10.0) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_s(10_000, 1.0, 300.0) == 300


def test_a_replay_starts_right_before_its_position():
    assert before("1700000000000-3") == "1700000000000-2"
    assert before("1700000000000-0") == f"1699999999999-{2**64 - 1}"
    assert before("1700000000000") == f"1699999999999-{2**64 - 1}"
    assert before("0") == "0-0"


def test_the_outbox_holds_the_webhook_event_types_once_each():
    assert {t.__name__ for t in projection._OUTBOX} == set(WEBHOOK_EVENT_TYPES)
    from datetime import UTC, datetime

    stamp = Stamp(now=datetime.now(UTC), new_id=uuid7)
    state = SessionState(id=uuid7())
    created = decide(state, CreateSession(body=SessionCreate()), stamp)
    state2 = fold(state, created)
    deleted = decide(state2, DeleteSession(), stamp)
    update = project(state, [*created, *deleted])
    assert [(v, t) for v, t, _ in update.outbox] == [(1, "SessionCreated"), (2, "SessionDeleted")]
    assert [i for _, _, i in update.outbox] == [created[0].id, deleted[0].id]
