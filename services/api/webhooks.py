"""Webhook endpoints: a tenant's subscriptions, their deliveries, and replays (`shared.app.webhooks`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import Provide
from litestar.params import Parameter

from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.context import api
from services.api.params import Limit, errors, json_list, json_response
from shared.domain.errors import NotFound
from shared.domain.ids import parse_uuid
from shared.domain.webhooks import (
    DeliveryList,
    Replay,
    SecretRotation,
    Webhook,
    WebhookChangePage,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookPatch,
)

__all__ = ["WebhookController", "webhook_changes"]

Deliveries = Annotated[int, Parameter(ge=1, le=1000, description="Delivery attempts, newest first (1..1000).")]
ChangesAfter = Annotated[
    str | None,
    Parameter(pattern=r"^[0-9]{1,19}-[0-9]{1,19}$", description="The `next` cursor of the previous page."),
]


def parse_webhook_id(raw: str) -> str:
    parsed = parse_uuid(raw)
    if parsed is None:
        raise NotFound(f"webhook {raw} not found")
    return parsed


class WebhookController(Controller):
    path = "/webhooks"
    tags = ["webhooks"]
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @post("/", status_code=201, responses=errors(), dto=StrictBody[WebhookCreate], return_dto=None)
    async def create_webhook(self, request: Request, tenant: str, data: WebhookCreate) -> Response[WebhookCreated]:
        """Subscribe `url` to the tenant's events of `event_types` (those projected from now on). The answer holds
        the signing `secret`, this once. A URL whose host is a loopback or private address is refused (422
        `webhook_url_refused`) unless the deployment allows it."""
        created = await api(request).parley.subscriptions.create(tenant, data)
        return json_response(created, 201, {"Location": f"/webhooks/{created.id}"})

    @get("/", responses=errors())
    async def list_webhooks(self, request: Request, tenant: str) -> Response[WebhookList]:
        """The tenant's subscriptions, oldest first (without their secrets)."""
        return json_response(await api(request).parley.subscriptions.of(tenant))

    @get("/{webhook_id:str}", responses=errors(404))
    async def get_webhook(self, request: Request, tenant: str, webhook_id: str) -> Response[Webhook]:
        return json_response(await api(request).parley.subscriptions.get(tenant, parse_webhook_id(webhook_id)))

    @patch("/{webhook_id:str}", responses=errors(404), dto=StrictBody[WebhookPatch], return_dto=None)
    async def update_webhook(
        self, request: Request, tenant: str, webhook_id: str, data: WebhookPatch
    ) -> Response[Webhook]:
        """Change only the fields present. `active: false` pauses deliveries (the cursor stays)."""
        subscriptions = api(request).parley.subscriptions
        return json_response(await subscriptions.update(tenant, parse_webhook_id(webhook_id), data))

    @delete("/{webhook_id:str}", status_code=204, responses=errors(404))
    async def delete_webhook(self, request: Request, tenant: str, webhook_id: str) -> None:
        """Unsubscribe: deliveries stop, and the subscription's delivery list goes with it."""
        await api(request).parley.subscriptions.delete(tenant, parse_webhook_id(webhook_id))

    @get("/{webhook_id:str}/deliveries", responses=errors(404))
    async def list_deliveries(
        self, request: Request, tenant: str, webhook_id: str, limit: Deliveries = 100
    ) -> Response[DeliveryList]:
        """The subscription's delivery attempts, newest first (the newest `PARLEY_WEBHOOK_DELIVERIES_KEPT`)."""
        subscriptions = api(request).parley.subscriptions
        return json_list(await subscriptions.deliveries(tenant, parse_webhook_id(webhook_id), limit))

    @post(
        "/{webhook_id:str}/rotate-secret",
        status_code=200,
        responses=errors(404),
        dto=StrictBody[SecretRotation],
        return_dto=None,
    )
    async def rotate_webhook_secret(
        self, request: Request, tenant: str, webhook_id: str, data: SecretRotation
    ) -> Response[WebhookCreated]:
        """A new signing `secret` (answered this once). For `previous_valid_s` (a day unless said) deliveries carry
        a signature by the old secret too, so receivers can switch without rejecting one."""
        subscriptions = api(request).parley.subscriptions
        return json_response(await subscriptions.rotate_secret(tenant, parse_webhook_id(webhook_id), data))

    @post("/{webhook_id:str}/replay", status_code=200, responses=errors(404), dto=StrictBody[Replay], return_dto=None)
    async def replay_webhook(self, request: Request, tenant: str, webhook_id: str, data: Replay) -> Response[Webhook]:
        """Deliver again every event at or after outbox position `from` (a delivery's `position`, or `<ms>`: from
        that time), as far back as the outbox still holds; each keeps its `webhook-id`."""
        subscriptions = api(request).parley.subscriptions
        return json_response(await subscriptions.replay(tenant, parse_webhook_id(webhook_id), data))


@get(
    "/audit/webhooks",
    tags=["webhooks"],
    dependencies={"tenant": Provide(provide_tenant)},
    security=[{"bearer": []}, {"apiKey": []}],
    responses=errors(),
)
async def webhook_changes(
    request: Request, tenant: str, after: ChangesAfter = None, limit: Limit = 100
) -> Response[WebhookChangePage]:
    """The tenant's webhook subscription changes, oldest first: `WebhookCreated`, `WebhookUpdated` (the fields
    changed), `WebhookDeleted`, `WebhookReplayed` (from where), `WebhookSecretRotated` (until when the previous
    secret signs too), each with its time; never a secret. Deleted
    subscriptions' stay."""
    items, cursor = await api(request).parley.subscriptions.changes(tenant, after, limit)
    return json_list(items, next=msgspec.json.encode(cursor))
