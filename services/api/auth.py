"""Bearer keys → tenants. Keys from PARLEY_API_KEYS, or hashed in Redis; lookups cached in process."""

from __future__ import annotations

import time
from collections.abc import Iterable

from litestar import Request
from litestar.exceptions import NotAuthorizedException

from services.api.context import api
from shared.app.ports import ApiKeys

__all__ = ["Authenticator", "key_of", "provide_tenant"]

NEGATIVE_TTL_S = 1.0


class Authenticator:
    """Key → tenant, from the configured keys, else the stored ones (cached: a hit costs no Redis round trip; an
    unknown key is remembered for a second only, so a key created elsewhere works at once)."""

    def __init__(self, static_keys: dict[str, str], stored: ApiKeys, ttl_s: float) -> None:
        self._static = dict(static_keys)
        self._stored = stored
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def tenant(self, key: str) -> str | None:
        if (tenant := self._static.get(key)) is not None:
            return tenant
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant = await self._stored.tenant_of(key)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = (tenant, now + (self._ttl_s if tenant else NEGATIVE_TTL_S))
        return tenant


def key_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The API key from `Authorization: Bearer <key>`, else `X-Auth-Key` (raw ASGI / parser headers). Either header
    sent twice names no key: which one a proxy in front checked is unknown (a 401, never a guess)."""
    bearer: bytes | None = None
    raw: bytes | None = None
    bearers = raws = 0
    for name, value in headers:  # one pass: every request runs this
        if name == b"authorization":
            bearer, bearers = value, bearers + 1
        elif name == b"x-auth-key":
            raw, raws = value, raws + 1
    if bearer is not None:
        if bearers > 1:
            return None
        scheme, _, token = bearer.decode("latin-1").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    if raw is None or raws > 1:
        return None
    return raw.decode("latin-1") or None


async def provide_tenant(request: Request) -> str:
    """The dependency every tenant-scoped handler declares as `tenant: str` (the guard usually found it already)."""
    tenant = request.scope.get("state", {}).get("parley.tenant")
    if tenant is not None:
        return tenant
    key = key_of(request.scope["headers"])
    if key is None:
        raise NotAuthorizedException("missing API key: send Authorization: Bearer <key> or X-Auth-Key")
    tenant = await api(request).auth.tenant(key)
    if tenant is None:
        raise NotAuthorizedException("invalid API key")
    request.scope.setdefault("state", {})["parley.tenant"] = tenant  # type: ignore[typeddict-item]
    return tenant
