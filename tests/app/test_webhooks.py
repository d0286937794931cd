"""The webhook deliverer on the memory adapters, with a sender that records what it was asked to POST and answers
what the test says: deliveries in outbox order, each attempt recorded, retries until the attempts run out, an event
purged meanwhile skipped, a change of types taking effect at once, a replay moving a retrying deliverer to the new
cursor, and a lease another holder has."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shared.app.ports import Sent
from shared.app.webhooks import DeliveryPolicy, WebhookDeliverer, WebhookSubscriptions
from shared.bootstrap import Parley
from shared.domain.errors import NotFound
from shared.domain.webhooks import (
    Replay,
    SecretRotation,
    Subscription,
    WebhookCreate,
    WebhookPatch,
    delivery_id,
    sign,
    verify,
)
from shared.domain.wire import SessionCreate
from tests.app.conftest import Deployment
from tests.support import wait_for

TIMEOUT_S = 10.0
"""Only an upper bound for what must happen; a passing test never waits it out."""
POLICY = DeliveryPolicy(max_attempts=3, retry_base_s=0.01, retry_max_s=0.02, poll_s=0.01, lease_s=5.0, keep=50)


class Sender:
    """Answers `statuses` in turn (then 200), and records every POST."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[str, dict[str, str], dict]] = []

    async def vet(self, url: str) -> str | None:
        return None

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> Sent:
        self.sent.append((url, headers, msgspec.json.decode(body)))
        return Sent(self.statuses.pop(0) if self.statuses else 200)

    def types(self) -> list[str]:
        return [b["type"] for _, _, b in self.sent]


@contextlib.asynccontextmanager
async def delivering(parley: Parley, sender: Sender, holder: str = "w1") -> AsyncIterator[WebhookDeliverer]:
    deliverer = WebhookDeliverer(parley.webhooks, parley.admin, sender, parley.settings.partitions, holder, POLICY)
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    try:
        yield deliverer
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)


async def session(parley: Parley, deployment: Deployment) -> str:
    created, _ = await parley.sessions.create("acme", SessionCreate())
    await deployment.project()
    await asyncio.sleep(0.002)  # outbox entry ids are milliseconds: the next projection's come later
    return created.id


async def deliveries(parley: Parley, sub_id: str) -> list[dict]:
    return [msgspec.json.decode(d) for d in await parley.webhooks.deliveries(sub_id, 100)]


@pytest.fixture
def deployment(parley: Parley) -> Deployment:
    return Deployment(parley)


async def test_deliveries_follow_the_outbox_and_each_attempt_is_listed(parley: Parley, deployment: Deployment):
    sender = Sender(500, 503)
    subs = WebhookSubscriptions(parley.webhooks, sender)
    hook = await subs.create("acme", WebhookCreate(url="http://h/", event_types=["SessionCreated", "SessionDeleted"]))
    first = await session(parley, deployment)
    await parley.sessions.delete("acme", first, None, None, False)
    await deployment.project()
    await asyncio.sleep(0.002)
    second = await session(parley, deployment)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= 5), TIMEOUT_S, "five POSTs")
    # each session's events in order (two partitions' entries of one millisecond may go either way)
    by_session = {sid: [b["type"] for _, _, b in sender.sent if b["session_id"] == sid] for sid in (first, second)}
    assert by_session == {first: ["SessionCreated"] * 3 + ["SessionDeleted"], second: ["SessionCreated"]}
    for _, headers, body in sender.sent:
        assert headers["webhook-id"] == delivery_id(hook.id, body["data"]["id"])
        raw = msgspec.json.encode(body)
        assert verify(
            hook.secret, headers["webhook-id"], int(headers["webhook-timestamp"]), raw, headers["webhook-signature"]
        )
    listed = await deliveries(parley, hook.id)
    assert [(d["attempt"], d["outcome"], d["status_code"]) for d in reversed(listed)][:3] == [
        (1, "retrying", 500),
        (2, "retrying", 503),
        (3, "succeeded", 200),
    ]
    assert [(d["attempt"], d["outcome"]) for d in listed[:2]] == [(1, "succeeded"), (1, "succeeded")]


async def test_a_delivery_fails_after_its_attempts_and_the_next_goes_on(parley: Parley, deployment: Deployment):
    sender = Sender(500, 500, 500)
    hook = await WebhookSubscriptions(parley.webhooks, sender).create(
        "acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"])
    )
    await session(parley, deployment)
    await session(parley, deployment)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= 4), TIMEOUT_S, "four POSTs")
    outcomes = [(d["attempt"], d["outcome"]) for d in reversed(await deliveries(parley, hook.id))]
    assert outcomes == [(1, "retrying"), (2, "retrying"), (3, "failed"), (1, "succeeded")]


async def test_a_purged_event_is_skipped(parley: Parley, deployment: Deployment):
    sender = Sender()
    hook = await WebhookSubscriptions(parley.webhooks, sender).create(
        "acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"])
    )
    gone = await session(parley, deployment)
    kept = await session(parley, deployment)
    await parley.history.purge("acme", gone)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, sender.sent), TIMEOUT_S, "a POST")
        await wait_for(lambda: deliveries(parley, hook.id), TIMEOUT_S, "the deliveries")
    assert [b["session_id"] for _, _, b in sender.sent] == [kept]
    listed = await deliveries(parley, hook.id)
    assert [(d["session_id"], d["outcome"]) for d in reversed(listed)] == [(gone, "skipped"), (kept, "succeeded")]


async def test_types_and_replays_take_effect_at_once(parley: Parley, deployment: Deployment):
    sender = Sender(*[500] * 1_000)  # never takes anything: the deliverer retries the first entry
    subs = WebhookSubscriptions(parley.webhooks, sender)
    hook = await subs.create("acme", WebhookCreate(url="http://h/", event_types=["SessionCreated", "SessionDeleted"]))
    sid = await session(parley, deployment)
    await parley.sessions.delete("acme", sid, None, None, False)
    await deployment.project()
    await subs.update("acme", hook.id, WebhookPatch(event_types=["SessionDeleted"]))
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= 2), TIMEOUT_S, "the retries")
        assert set(sender.types()) == {"SessionDeleted"}  # SessionCreated, read ahead, is not for it any more
        await subs.update("acme", hook.id, WebhookPatch(event_types=["SessionCreated", "SessionDeleted"]))
        [created] = [d for d in await deliveries(parley, hook.id)][:1]
        sender.statuses, sent = [], len(sender.sent)  # the receiver recovers; no await between: atomic here
        await subs.replay("acme", hook.id, Replay(from_="0"))  # from the outbox's beginning, in a new epoch
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= sent + 2), TIMEOUT_S, "the replay")
    # the retrying deliverer left the old epoch's entry at once and went on from the replay's position
    assert sender.types()[sent:] == ["SessionCreated", "SessionDeleted"]
    assert created["event_type"] == "SessionDeleted"


async def test_a_lease_another_holder_has_is_left_alone(parley: Parley, deployment: Deployment):
    sender = Sender()
    hook = await WebhookSubscriptions(parley.webhooks, sender).create(
        "acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"])
    )
    await session(parley, deployment)
    assert await parley.webhooks.lease(hook.id, "elsewhere", 60_000)
    deliverer = WebhookDeliverer(parley.webhooks, parley.admin, sender, parley.settings.partitions, "w1", POLICY)
    await asyncio.wait_for(deliverer.serve(hook.id, asyncio.Event()), TIMEOUT_S)  # returns at once
    assert sender.sent == []
    await parley.webhooks.release(hook.id, "elsewhere")
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, sender.sent), TIMEOUT_S, "a POST once the lease is free")


async def test_a_rotated_secret_signs_beside_the_new_one_until_it_expires(parley: Parley, deployment: Deployment):
    sender = Sender()
    subs = WebhookSubscriptions(parley.webhooks, sender)
    hook = await subs.create("acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"]))
    rotated = await subs.rotate_secret("acme", hook.id, SecretRotation(previous_valid_s=60))
    assert rotated.secret != hook.secret and rotated.id == hook.id
    await session(parley, deployment)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, sender.sent), TIMEOUT_S, "a delivery")
    _, headers, body = sender.sent[0]
    raw = msgspec.json.encode(body)
    signed = headers["webhook-id"], int(headers["webhook-timestamp"]), raw, headers["webhook-signature"]
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(rotated.secret, *signed) and verify(hook.secret, *signed)  # either secret checks it

    mine = "whsec_" + "A" * 32
    latest = await subs.rotate_secret("acme", hook.id, SecretRotation(secret=mine, previous_valid_s=0))
    assert latest.secret == mine
    await session(parley, deployment)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= 2), TIMEOUT_S, "the next delivery")
    _, headers, body = sender.sent[1]
    signed = headers["webhook-id"], int(headers["webhook-timestamp"]), msgspec.json.encode(body)
    assert verify(mine, *signed, headers["webhook-signature"])
    assert not verify(rotated.secret, *signed, headers["webhook-signature"])  # at once: the old one no longer signs
    with pytest.raises(NotFound):
        await subs.rotate_secret("globex", hook.id, SecretRotation())  # not another tenant's


def test_the_previous_secret_signs_only_until_it_expires() -> None:
    now = datetime.now(UTC)
    sub = Subscription(
        id="s",
        tenant="acme",
        url="http://h/",
        event_types=["SessionCreated"],
        secret="new",
        created_at=now,
        updated_at=now,
        previous_secret="old",
        previous_until=now + timedelta(seconds=60),
    )
    assert sub.secrets(now) == ["new", "old"]
    assert sub.secrets(now + timedelta(seconds=60)) == ["new"]


@pytest.mark.parametrize("size", range(10, 70))
def test_a_secret_the_api_lets_in_is_the_base64_of_16_to_64_bytes_and_signs(size: int) -> None:
    """The body's pattern is exact: a secret it admits always decodes (one it admitted that did not would have made
    every delivery of its subscription raise, and the worker exit, again at every restart)."""
    secret = "whsec_" + base64.b64encode(os.urandom(size)).decode()
    for text in (secret, secret.rstrip("="), secret + "=", secret[:-1] + "A=" if secret.endswith("=") else None):
        if text is None:
            continue
        body = {"url": "http://h/", "event_types": ["SessionCreated"], "secret": text}
        try:
            msgspec.convert(body, WebhookCreate)
        except msgspec.ValidationError:
            admitted = False
        else:
            admitted = True
        assert admitted == (text == secret and 16 <= size <= 64), text
        if admitted:
            assert verify(text, "m", 1, b"{}", sign(text, "m", 1, b"{}"))


async def test_a_stored_secret_that_cannot_sign_fails_its_deliveries_and_the_deliverer_goes_on(
    parley: Parley, deployment: Deployment
):
    """A secret stored before the API checked them exactly: each delivery fails at once, saying why, instead of the
    deliverer (and with it the worker) ending."""
    sender = Sender()
    subs = WebhookSubscriptions(parley.webhooks, sender)
    bad = await subs.create("acme", WebhookCreate(url="http://bad/", event_types=["SessionCreated"]))
    good = await subs.create("acme", WebhookCreate(url="http://good/", event_types=["SessionCreated"]))
    loaded = await parley.webhooks.load(bad.id)
    assert loaded is not None
    broken = msgspec.structs.replace(loaded[0], secret="whsec_" + "A" * 22)
    assert await parley.webhooks.update(broken, msgspec.json.encode({"type": "WebhookUpdated"}), broken.updated_at)
    await session(parley, deployment)
    await session(parley, deployment)
    async with delivering(parley, sender):
        await wait_for(lambda: asyncio.sleep(0, len(sender.sent) >= 2), TIMEOUT_S, "the good one's two POSTs")

        async def failed_twice() -> bool:
            return len(await deliveries(parley, bad.id)) >= 2

        await wait_for(failed_twice, TIMEOUT_S, "the bad one's two failures")
    assert {url for url, _, _ in sender.sent} == {"http://good/"}
    failed = [(d["attempt"], d["outcome"], d["error"]) for d in await deliveries(parley, bad.id)]
    assert failed == [(1, "failed", "the subscription's secret is not base64: rotate it")] * 2
    assert len(await deliveries(parley, good.id)) == 2


async def test_a_patch_that_changes_nothing_records_nothing(parley: Parley):
    subs = WebhookSubscriptions(parley.webhooks, Sender())
    hook = await subs.create("acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"]))
    created = await subs.get("acme", hook.id)
    for patch in (
        WebhookPatch(),
        WebhookPatch(url="http://h/", active=True),
        WebhookPatch(event_types=["SessionCreated"]),
    ):
        assert await subs.update("acme", hook.id, patch) == created
    assert len((await subs.changes("acme", None, 100))[0]) == 1  # WebhookCreated alone
    paused = await subs.update("acme", hook.id, WebhookPatch(active=False))
    assert not paused.active and paused.updated_at > created.updated_at
    assert len((await subs.changes("acme", None, 100))[0]) == 2


async def test_a_secret_rotation_and_a_pause_made_at_once_both_stick(real_redis) -> None:
    """Each change is decided on the subscription as read and stored only if it is still so (else read again and
    redone): before, the rotation could answer a new secret while the pause, written after it from an older read,
    put the leaked one back."""
    from shared.adapters.redis.keys import Keys
    from shared.adapters.redis.webhooks import RedisWebhooks

    hooks = RedisWebhooks(real_redis, Keys(4))
    subs = WebhookSubscriptions(hooks, Sender())
    for _ in range(10):
        hook = await subs.create("acme", WebhookCreate(url="http://h/", event_types=["SessionCreated"]))
        rotated, _ = await asyncio.gather(
            subs.rotate_secret("acme", hook.id, SecretRotation(previous_valid_s=0)),
            subs.update("acme", hook.id, WebhookPatch(active=False)),
        )
        loaded = await hooks.load(hook.id)
        assert loaded is not None
        assert loaded[0].active is False and loaded[0].secret == rotated.secret != hook.secret
