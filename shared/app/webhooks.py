"""Webhooks: a tenant's subscriptions (`WebhookSubscriptions`) and their delivery from the outbox
(`WebhookDeliverer`, a worker's supervised part).

The outbox holds each event of a webhook type once (the live `APPLY` writes it, version-fenced). A subscription's
cursor is its position in each partition's outbox, so a restart resumes where the last acknowledged delivery left
off and a replay is a cursor moved back. One worker at a time delivers a subscription (a lease with a TTL, renewed
as it works); it delivers the subscription's entries one at a time, oldest first, and moves the cursor past an
entry only once the receiver answered 2xx or the attempts ran out. So nothing is skipped, and an entry delivered
twice (a worker killed between the receiver's answer and the cursor's move, or a lease lost) carries the same
`webhook-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from shared.app.ports import LogAdmin, Webhooks, WebhookSender
from shared.domain.errors import Contention, Invalid, NotFound, WebhookUrlRefused
from shared.domain.ids import uuid7
from shared.domain.webhooks import (
    ChangeType,
    Delivery,
    OutboxEntry,
    Outcome,
    Replay,
    SecretRotation,
    Subscription,
    Webhook,
    WebhookChange,
    WebhookChangeData,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookPatch,
    WebhookPayload,
    backoff_s,
    before,
    delivery_id,
    new_secret,
    parse_position,
    signature,
)

__all__ = ["DeliveryPolicy", "WebhookDeliverer", "WebhookSubscriptions"]

log = logging.getLogger("parley.webhooks")
MAX_CHANGE_ATTEMPTS = 8
"""Times a change of a subscription is redone when another change came in between."""
_CURSOR = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
_encode = msgspec.json.Encoder().encode


class WebhookSubscriptions:
    """Create, read, change and delete a tenant's subscriptions; rotate their secrets; list their deliveries;
    replay from a position."""

    def __init__(self, webhooks: Webhooks, sender: WebhookSender, clock: Callable[[], float] = time.time) -> None:
        self.webhooks = webhooks
        self.sender = sender
        self.clock = clock

    async def create(self, tenant: str, body: WebhookCreate) -> WebhookCreated:
        await self._vet(body.url)
        now = datetime.fromtimestamp(self.clock(), UTC)
        sub = Subscription(
            id=uuid7(),
            tenant=tenant,
            url=body.url,
            event_types=list(dict.fromkeys(body.event_types)),
            secret=body.secret or new_secret(),
            created_at=now,
            updated_at=now,
        )
        await self.webhooks.create(sub, self._change("WebhookCreated", sub, url=sub.url, event_types=sub.event_types))
        _changed("created", sub, url=sub.url, event_types=sub.event_types)
        return WebhookCreated(**msgspec.structs.asdict(sub.resource()), secret=sub.secret)

    async def of(self, tenant: str) -> WebhookList:
        return WebhookList([s.resource() for s in await self.webhooks.of(tenant)])

    async def get(self, tenant: str, sub_id: str) -> Webhook:
        return (await self._sub(tenant, sub_id)).resource()

    async def update(self, tenant: str, sub_id: str, patch: WebhookPatch) -> Webhook:
        if patch.url is not None:
            sub = await self._sub(tenant, sub_id)
            if patch.url != sub.url:
                await self._vet(patch.url)
        what = {f: getattr(patch, f) for f in ("url", "event_types", "active") if getattr(patch, f) is not None}

        def patched(sub: Subscription) -> Subscription:
            return msgspec.structs.replace(
                sub,
                url=sub.url if patch.url is None else patch.url,
                event_types=sub.event_types if patch.event_types is None else list(dict.fromkeys(patch.event_types)),
                active=sub.active if patch.active is None else patch.active,
            )

        changed = await self._change_sub(tenant, sub_id, patched, lambda s: self._change("WebhookUpdated", s, **what))
        _changed("updated", changed, url=changed.url, event_types=changed.event_types, active=changed.active)
        return changed.resource()

    async def delete(self, tenant: str, sub_id: str) -> None:
        sub = await self._sub(tenant, sub_id)
        if not await self.webhooks.delete(tenant, sub_id, self._change("WebhookDeleted", sub)):
            raise NotFound(f"webhook {sub_id} not found")
        log.info("webhook deleted", extra={"fields": {"tenant": tenant, "webhook_id": sub_id}})

    async def deliveries(self, tenant: str, sub_id: str, limit: int) -> list[bytes]:
        await self._sub(tenant, sub_id)
        return await self.webhooks.deliveries(sub_id, limit)

    async def rotate_secret(self, tenant: str, sub_id: str, body: SecretRotation) -> WebhookCreated:
        """A new signing secret; the old one signs deliveries too for `previous_valid_s` more."""
        secret = body.secret or new_secret()

        def rotate(sub: Subscription) -> Subscription:
            until = datetime.fromtimestamp(self.clock(), UTC) + timedelta(seconds=body.previous_valid_s)
            return msgspec.structs.replace(
                sub,
                secret=secret,
                previous_secret=sub.secret if body.previous_valid_s else None,
                previous_until=until if body.previous_valid_s else None,
            )

        rotated = await self._change_sub(
            tenant,
            sub_id,
            rotate,
            lambda s: self._change("WebhookSecretRotated", s, previous_until=s.previous_until),
            always=True,
        )
        _changed("secret rotated", rotated, previous_until=str(rotated.previous_until))
        return WebhookCreated(**msgspec.structs.asdict(rotated.resource()), secret=rotated.secret)

    async def replay(self, tenant: str, sub_id: str, body: Replay) -> Webhook:
        """Deliver again every outbox entry at or after `body.from_` (the outbox keeps its newest entries only)."""
        sub = await self._sub(tenant, sub_id)
        change = self._change("WebhookReplayed", sub, from_=body.from_)
        if not await self.webhooks.replay(tenant, sub_id, before(body.from_), change):
            raise NotFound(f"webhook {sub_id} not found")
        _changed("replayed", sub, **{"from": body.from_})
        return sub.resource()

    async def changes(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        """The tenant's subscription changes, oldest first (deleted subscriptions' too)."""
        if after is not None and not _CURSOR.fullmatch(after):
            raise Invalid("after must be the `next` of a previous page", {"query": "after"})
        return await self.webhooks.changes(tenant, after, limit)

    def _change(self, kind: ChangeType, sub: Subscription, **fields: Any) -> bytes:
        at = datetime.fromtimestamp(self.clock(), UTC)
        data = WebhookChangeData(webhook_id=sub.id, **fields)
        return _encode(WebhookChange(type=kind, id=uuid7(), occurred_at=at, data=data))

    async def _change_sub(
        self,
        tenant: str,
        sub_id: str,
        change: Callable[[Subscription], Subscription],
        record: Callable[[Subscription], bytes],
        always: bool = False,
    ) -> Subscription:
        """Apply `change` to the subscription as stored and store it, unless another change came in between: then
        read it again and apply `change` to that (a rotation and a pause made at once both stick). A change that
        changes nothing stores nothing, unless `always`."""
        for _ in range(MAX_CHANGE_ATTEMPTS):
            sub = await self._sub(tenant, sub_id)
            changed = change(sub)
            if changed == sub and not always:
                return sub
            now = datetime.fromtimestamp(self.clock(), UTC)
            # updated_at is the version the store compares: it moves on with every change, even within a microsecond
            changed = msgspec.structs.replace(changed, updated_at=max(now, sub.updated_at + timedelta(microseconds=1)))
            done = await self.webhooks.update(changed, record(changed), sub.updated_at)
            if done is None:
                continue
            if not done:
                raise NotFound(f"webhook {sub_id} not found")
            return changed
        raise Contention(f"webhook {sub_id} kept changing; retry")

    async def _sub(self, tenant: str, sub_id: str) -> Subscription:
        sub = await self.webhooks.get(tenant, sub_id)
        if sub is None:
            raise NotFound(f"webhook {sub_id} not found")
        return sub

    async def _vet(self, url: str) -> None:
        refusal = await self.sender.vet(url)
        if refusal is not None:
            raise WebhookUrlRefused(f"the webhook URL is refused: {refusal}", {"field": "url"})


def _changed(action: str, sub: Subscription, **fields: object) -> None:
    """Every change of a subscription leaves a log line (its secret never)."""
    log.info(f"webhook {action}", extra={"fields": {"tenant": sub.tenant, "webhook_id": sub.id, **fields}})


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    """Attempts per entry; after the last failed one the delivery is `failed` and the cursor moves on."""
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    poll_s: float = 0.5
    """How often an idle subscription looks at the outbox again."""
    lease_s: float = 15.0
    """A subscription's lease: another worker takes it over this long after its holder died."""
    keep: int = 100
    """Delivery attempts kept per subscription (`GET /webhooks/{id}/deliveries`)."""
    batch: int = 100


@dataclass
class _Reading:
    """One subscription's read position while a deliverer holds it: per partition, the entries read ahead and
    the position read up to (the stored cursor moves only as entries are done)."""

    epoch: int
    after: dict[int, str]
    ahead: dict[int, deque[OutboxEntry]] = field(default_factory=dict)


class WebhookDeliverer:
    """Delivers every subscription whose lease it can take, one task per subscription, until `stop`."""

    def __init__(
        self,
        webhooks: Webhooks,
        admin: LogAdmin,
        sender: WebhookSender,
        partitions: int,
        holder: str,
        policy: DeliveryPolicy = DeliveryPolicy(),
        on_attempt: Callable[[Delivery], None] = lambda d: None,
        on_lag: Callable[[str, float], None] = lambda sub_id, s: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.webhooks = webhooks
        self.admin = admin
        self.sender = sender
        self.partitions = partitions
        self.holder = holder
        self.policy = policy
        self.on_attempt = on_attempt
        self.on_lag = on_lag
        self.clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        """A store error in a subscription's task ends this part (its supervisor runs it again)."""
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                for sub_id, task in list(tasks.items()):
                    if task.done():
                        del tasks[sub_id]
                        task.result()  # raises what ended it
                for sub_id in await self.webhooks.ids():
                    if sub_id not in tasks:
                        tasks[sub_id] = asyncio.create_task(self.serve(sub_id, stop), name=f"webhook-{sub_id}")
                await _wait(stop, self.policy.poll_s)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def serve(self, sub_id: str, stop: asyncio.Event) -> None:
        """Deliver the subscription while this deliverer holds its lease (returns at once if another does)."""
        ttl_ms = int(self.policy.lease_s * 1000)
        if not await self.webhooks.lease(sub_id, self.holder, ttl_ms):
            return
        try:
            reading: _Reading | None = None
            while not stop.is_set():
                if not await self.webhooks.lease(sub_id, self.holder, ttl_ms):
                    return  # lost it (this process stalled past its TTL): the new holder goes on
                loaded = await self.webhooks.load(sub_id)
                if loaded is None or not loaded[0].active:
                    return
                sub, cursor = loaded
                if reading is None or reading.epoch != cursor.epoch:  # a replay moved the cursor
                    reading = _Reading(cursor.epoch, {p: cursor.after(p) for p in range(self.partitions)})
                entry = await self._next(sub, reading)
                if entry is None:
                    self.on_lag(sub_id, 0.0)
                    await _wait(stop, self.policy.poll_s)
                    continue
                self.on_lag(sub_id, max(0.0, self.clock() - parse_position(entry.position)[0] / 1000))
                if await self._deliver(sub, entry, reading.epoch, stop):
                    reading.ahead[entry.partition].popleft()
                    if not await self.webhooks.advance(sub_id, reading.epoch, entry.partition, entry.position):
                        reading = None  # replayed or deleted meanwhile: read the cursor again
                else:
                    reading = None
        finally:
            self.on_lag(sub_id, 0.0)
            with contextlib.suppress(Exception):
                await self.webhooks.release(sub_id, self.holder)

    async def _next(self, sub: Subscription, reading: _Reading) -> OutboxEntry | None:
        """The subscription's oldest undone entry over all partitions (a batch per partition read ahead, the
        partitions with nothing ahead in one round trip; filtered by the subscription as it is now: a change of its
        types takes effect at once)."""
        empty = {p: reading.after[p] for p in range(self.partitions) if not reading.ahead.get(p)}
        for p, entries in (await self.webhooks.outbox(empty, self.policy.batch)).items():
            reading.ahead[p] = deque(entries)
            if entries:
                reading.after[p] = entries[-1].position
        for p, queue in reading.ahead.items():
            skipped = False
            while queue and not (queue[0].tenant == sub.tenant and queue[0].event_type in sub.event_types):
                queue.popleft()
                skipped = True
            if skipped and not queue:  # none of the batch is for the subscription: step its cursor over it
                await self.webhooks.advance(sub.id, reading.epoch, p, reading.after[p])
        heads = [q[0] for q in reading.ahead.values() if q]
        return min(heads, key=lambda e: parse_position(e.position)) if heads else None

    async def _deliver(self, sub: Subscription, entry: OutboxEntry, epoch: int, stop: asyncio.Event) -> bool:
        """Attempt the entry until the receiver takes it or the attempts run out (True: done with it), or stop
        early (False) when this deliverer stops, loses the lease, or the subscription was paused, deleted or
        replayed meanwhile."""
        did = delivery_id(sub.id, entry.event_id)
        logged = await self.admin.log_json(entry.session_id, entry.version - 1, 1)
        if not logged or logged[0][0] != entry.version:
            await self._record(sub, entry, did, 1, "skipped", None, "the event is gone (its session was purged)", 0)
            return True
        body = _encode(
            WebhookPayload(type=entry.event_type, session_id=entry.session_id, data=msgspec.Raw(logged[0][1]))
        )
        attempt = 0
        while True:
            attempt += 1
            timestamp = int(self.clock())
            try:
                signed = signature(sub.secrets(datetime.fromtimestamp(timestamp, UTC)), did, timestamp, body)
            except ValueError:  # a secret stored before the API checked them exactly: no attempt can be signed
                error = "the subscription's secret is not base64: rotate it"
                await self._record(sub, entry, did, attempt, "failed", None, error, 0)
                return True
            headers = {"webhook-id": did, "webhook-timestamp": str(timestamp), "webhook-signature": signed}
            started = time.monotonic()
            sent = await self.sender.send(sub.url, headers, body)
            ms = int((time.monotonic() - started) * 1000)
            ok = sent.status_code is not None and 200 <= sent.status_code < 300
            final = ok or attempt >= self.policy.max_attempts
            outcome: Outcome = "succeeded" if ok else "failed" if final else "retrying"
            await self._record(sub, entry, did, attempt, outcome, sent.status_code, sent.error, ms)
            if final:
                return True
            if not await self._wait_retry(sub, attempt, stop):
                return False
            loaded = await self.webhooks.load(sub.id)
            if loaded is None or not loaded[0].active or loaded[1].epoch != epoch:
                return False
            sub = loaded[0]  # its URL may have changed meanwhile

    async def _wait_retry(self, sub: Subscription, attempt: int, stop: asyncio.Event) -> bool:
        """Back off before the next attempt, renewing the lease meanwhile; False: stopped or the lease is lost."""
        deadline = time.monotonic() + backoff_s(attempt, self.policy.retry_base_s, self.policy.retry_max_s)
        ttl_ms = int(self.policy.lease_s * 1000)
        while (left := deadline - time.monotonic()) > 0:
            if await _wait(stop, min(left, self.policy.lease_s / 3)):
                return False
            if not await self.webhooks.lease(sub.id, self.holder, ttl_ms):
                return False
        return True

    async def _record(
        self,
        sub: Subscription,
        entry: OutboxEntry,
        did: str,
        attempt: int,
        outcome: Outcome,
        status_code: int | None,
        error: str | None,
        ms: int,
    ) -> None:
        delivery = Delivery(
            id=did,
            event_id=entry.event_id,
            event_type=entry.event_type,
            session_id=entry.session_id,
            position=entry.position,
            attempt=attempt,
            outcome=outcome,
            status_code=status_code,
            error=error,
            duration_ms=ms,
            at=datetime.fromtimestamp(self.clock(), UTC),
        )
        await self.webhooks.record(sub.id, _encode(delivery), self.policy.keep)
        self.on_attempt(delivery)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
