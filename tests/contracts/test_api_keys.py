"""The `ApiKeys` contract: a created key names its tenant until it is revoked, by the key or by its id."""

from __future__ import annotations

from shared.domain.ids import key_id
from tests.contracts.conftest import Backend


async def test_api_keys_create_lookup_and_revoke(backend: Backend) -> None:
    keys = backend.api_keys
    k1, k2 = await keys.create("acme"), await keys.create("globex")
    assert k1 != k2 and k1.startswith("pk_")
    assert await keys.tenant_of(k1) == "acme" and await keys.tenant_of(k2) == "globex"
    assert await keys.tenant_of("pk_nope") is None
    assert sorted(await keys.list()) == sorted([(key_id(k1), "acme"), (key_id(k2), "globex")])
    assert await keys.revoke(key_id(k1))
    assert await keys.revoke(k2)
    assert not await keys.revoke(k2)
    assert not await keys.revoke("pk_never")
    assert await keys.tenant_of(k1) is None and await keys.tenant_of(k2) is None
    assert await keys.list() == []


async def test_keys_are_listed_by_tenant_then_id(backend: Backend) -> None:
    keys = backend.api_keys
    made = [(await keys.create(t), t) for t in ("globex", "acme", "acme")]
    assert await keys.list() == sorted(((key_id(k), t) for k, t in made), key=lambda x: (x[1], x[0]))
