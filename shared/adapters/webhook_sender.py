"""Webhook deliveries over HTTP (the `WebhookSender` port), guarded against server-side request forgery.

A URL's host is resolved and every address it names must be globally routable (`address_refused`), unless
`PARLEY_WEBHOOKS_ALLOW_PRIVATE` is on: at subscribe time and again at each delivery (DNS can change). The POST then
goes to the very address that was vetted (the URL's host as `Host` and, for https, as the TLS server name), so a
second resolution cannot swap in a private one; redirects are never followed.
"""

from __future__ import annotations

import asyncio
import socket

import httpx

from shared.app.ports import Sent
from shared.domain.webhooks import address_refused

__all__ = ["HttpWebhookSender"]

RESOLVE_TIMEOUT_S = 2.0


class HttpWebhookSender:
    def __init__(self, timeout_s: float, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False, headers={"User-Agent": "Parley"}
        )

    async def vet(self, url: str) -> str | None:
        refusal, _ = await self._resolve(url)
        return refusal

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> Sent:
        refusal, address = await self._resolve(url)
        if refusal is not None or address is None:
            return Sent(None, refusal)
        target = httpx.URL(url)
        host = target.host
        pinned = target.copy_with(host=address)
        extensions = {"sni_hostname": host} if target.scheme == "https" else {}
        headers = {**headers, "Host": target.netloc.decode(), "Content-Type": "application/json"}
        try:
            async with self.client.stream("POST", pinned, headers=headers, content=body, extensions=extensions) as r:
                return Sent(r.status_code)
        except httpx.HTTPError as e:
            return Sent(None, f"{type(e).__name__}: {e}"[:300])

    async def _resolve(self, url: str) -> tuple[str | None, str | None]:
        """(why the URL is refused or None, the address to connect to)."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            return "the URL is not valid", None
        if target.scheme not in ("http", "https") or not target.host:
            return "the URL must be http or https with a host", None
        if target.userinfo:
            return "the URL must not carry credentials", None
        if target.port is not None and not 0 < target.port < 65536:  # 0 would connect to the scheme's own
            return "the URL's port must be 1 to 65535", None
        try:
            port = target.port or (443 if target.scheme == "https" else 80)
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(target.host, port, type=socket.SOCK_STREAM),
                RESOLVE_TIMEOUT_S,
            )
        except (OSError, TimeoutError, UnicodeError):
            return f"the host {target.host} does not resolve", None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            return f"the host {target.host} does not resolve", None
        if not self.allow_private and any(address_refused(a) for a in addresses):
            return (
                f"the host {target.host} is a loopback or private address (PARLEY_WEBHOOKS_ALLOW_PRIVATE is off)",
                None,
            )
        return None, addresses[0]

    async def aclose(self) -> None:
        await self.client.aclose()
