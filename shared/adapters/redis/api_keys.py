"""API keys stored hashed in Redis; `parley keys create/revoke/list` manage them."""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from shared.adapters.redis.keys import Keys
from shared.domain.ids import key_hash, key_id

__all__ = ["RedisApiKeys"]


class RedisApiKeys:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def tenant_of(self, key: str) -> str | None:
        tenant = await self.redis.hget(Keys.api_keys, key_hash(key))
        return tenant.decode() if tenant else None

    async def create(self, tenant: str) -> str:
        key = "pk_" + secrets.token_urlsafe(32)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(Keys.api_keys, key_hash(key), tenant)
        pipe.hset(Keys.api_key_ids, key_id(key), key_hash(key))
        await pipe.execute()
        return key

    async def revoke(self, key_or_id: str) -> bool:
        digest = await self.redis.hget(Keys.api_key_ids, key_or_id)
        kid = key_or_id
        if digest is None:
            kid, digest = key_id(key_or_id), key_hash(key_or_id).encode()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(Keys.api_keys, digest)
        pipe.hdel(Keys.api_key_ids, kid)
        removed, _ = await pipe.execute()
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
