"""API keys in memory (the `ApiKeys` port): stored as their SHA-256, revocable by key or by key id."""

from __future__ import annotations

import secrets

from shared.adapters.memory.store import Memory
from shared.domain.ids import key_hash, key_id

__all__ = ["MemoryApiKeys"]


class MemoryApiKeys:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    async def tenant_of(self, key: str) -> str | None:
        return self.memory.api_keys.get(key_hash(key))

    async def create(self, tenant: str) -> str:
        key = "pk_" + secrets.token_urlsafe(32)
        self.memory.api_keys[key_hash(key)] = tenant
        self.memory.api_key_ids[key_id(key)] = key_hash(key)
        return key

    async def revoke(self, key_or_id: str) -> bool:
        m = self.memory
        kid, digest = key_or_id, m.api_key_ids.get(key_or_id)
        if digest is None:
            kid, digest = key_id(key_or_id), key_hash(key_or_id)
        m.api_key_ids.pop(kid, None)
        return m.api_keys.pop(digest, None) is not None

    async def list(self) -> list[tuple[str, str]]:
        m = self.memory
        found = [(kid, m.api_keys[d]) for kid, d in m.api_key_ids.items() if d in m.api_keys]
        return sorted(found, key=lambda x: (x[1], x[0]))
