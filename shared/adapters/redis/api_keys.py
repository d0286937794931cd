"""API keys stored hashed in Redis; `parley keys create/revoke/list` manage them."""

from __future__ import annotations

import secrets

from shared.adapters.redis.cluster import Client
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.scripts import KEY_CREATE, KEY_REVOKE
from shared.domain.ids import key_hash, key_id

__all__ = ["RedisApiKeys"]


class RedisApiKeys:
    """Both hashes share the `{auth}` hash tag, so creating and revoking are one script each, in one slot."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis

    async def tenant_of(self, key: str) -> str | None:
        tenant = await self.redis.hget(Keys.api_keys, key_hash(key))
        return tenant.decode() if tenant else None

    async def create(self, tenant: str) -> str:
        key = "pk_" + secrets.token_urlsafe(32)
        await KEY_CREATE(self.redis, [Keys.api_keys, Keys.api_key_ids], [key_hash(key), key_id(key), tenant])
        return key

    async def revoke(self, key_or_id: str) -> bool:
        removed = await KEY_REVOKE(
            self.redis, [Keys.api_keys, Keys.api_key_ids], [key_or_id, key_id(key_or_id), key_hash(key_or_id)]
        )
        return bool(removed)

    async def list(self) -> list[tuple[str, str]]:
        """(key id, tenant) of every stored key."""
        ids = await self.redis.hgetall(Keys.api_key_ids)
        out = []
        for kid, digest in ids.items():
            tenant = await self.redis.hget(Keys.api_keys, digest)
            if tenant:
                out.append((kid.decode(), tenant.decode()))
        return sorted(out, key=lambda x: (x[1], x[0]))
