"""Redis Cluster: redis-py 5.3's asyncio `RedisCluster`, with what Parley needs fixed or made explicit.

- **Pipelines.** redis-py 5.3's `ClusterPipeline.execute` retries the whole pipeline `cluster_error_retry_attempts`
  times and raises `UnboundLocalError` when that is 0; its retry also re-runs every command whose result was falsy.
  Parley keeps client retries off (as on a single Redis: a retried write after a lost reply could be doubled;
  APPEND recognises its own events anyway), so `Pipeline.execute` runs once and, on a connection error or timeout,
  drops the topology so the next command re-reads it (what redis-py does for single commands).
- **Scripts in pipelines.** `ClusterPipeline.evalsha` is blocked in 5.3; `lua.Script.queue` sends a raw EVALSHA,
  which the pipeline routes by its first key (each node gets its own pipeline, sent in parallel).
- **Stream reads.** redis-py finds the keys of XREAD / XREADGROUP with a `COMMAND GETKEYS` round trip to one node
  per call; `_determine_slot` reads them after `STREAMS` itself.
- **Every primary.** `primaries()` lists the nodes that hold slots: `PING`, `SCRIPT LOAD`, `CONFIG GET`,
  `BGREWRITEAOF` and `BGSAVE` go to each of them (`connect.ping`, `RedisHistory.rewrite_persistence`).

A multi-key command or script must name keys of one slot: every key of a partition has the hash tag `{pN}`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import CLUSTER_SCHEMES

__all__ = ["CLUSTER_SCHEMES", "Client", "ClusterUrl", "ParleyCluster", "is_cluster_url", "parse_cluster_url"]


class ParleyCluster(RedisCluster):
    def __init__(self, *args: Any, connection_class: type | None = None, **kwargs: Any) -> None:
        """`connection_class`: the nodes' connections' class (redis-py 5.3 fixes it; Parley packs with hiredis)."""
        super().__init__(*args, **kwargs)
        if connection_class is not None:
            self.connection_kwargs["connection_class"] = connection_class  # the dict the nodes are made from
            for node in self.nodes_manager.startup_nodes.values():
                node.connection_class = connection_class

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Pipeline:
        if transaction or shard_hint:
            raise RedisClusterException("no MULTI on a cluster: use a script (one slot)")
        return Pipeline(self)

    def primaries(self) -> list[ClusterNode]:
        return self.get_primaries()

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in ("XREAD", "XREADGROUP"):
            words = [a.upper() if isinstance(a, str) else a for a in args]
            at = words.index("STREAMS") if "STREAMS" in words else words.index(b"STREAMS")
            rest = args[at + 1 :]
            slots = {self.keyslot(k) for k in rest[: len(rest) // 2]}
            if len(slots) != 1:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)


Client = Redis | ParleyCluster
"""What every Redis adapter is given: one Redis (or fakeredis), or a cluster."""


class Pipeline(ClusterPipeline):
    """Runs once; see the module's docstring."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        if not self._command_stack:
            return []
        try:
            if self._client._initialize:
                await self._client.initialize()
            try:
                return await self._execute(
                    self._client,
                    self._command_stack,
                    raise_on_error=raise_on_error,
                    allow_redirections=allow_redirections,
                )
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await self._client.aclose()  # the next command re-reads the topology (a failover may be under way)
                raise
        finally:
            self._command_stack = []


class ClusterUrl:
    """`redis+cluster://[user:password@]host:port[,host:port…][?…]`: the startup nodes and the credentials."""

    def __init__(self, nodes: list[tuple[str, int]], username: str | None, password: str | None, ssl: bool) -> None:
        self.nodes = nodes
        self.username = username
        self.password = password
        self.ssl = ssl


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """Also accepts `redis://` / `rediss://` (with PARLEY_REDIS_CLUSTER=1): one or more startup nodes."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in (*CLUSTER_SCHEMES, "redis", "rediss"):
        raise ValueError(f"not a Redis URL: {url!r}")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if pw else None)
    nodes: list[tuple[str, int]] = []
    for part in filter(None, hosts.split(",")):
        parsed = urlsplit(f"//{part}")
        if not parsed.hostname:
            raise ValueError(f"no host in {part!r} of {url!r}")
        nodes.append((parsed.hostname, parsed.port or 6379))
    if not nodes:
        raise ValueError(f"no startup node in {url!r}")
    query = parse_qs(urlsplit(f"//x/?{rest.partition('?')[2]}").query)
    if "db" in query and query["db"] != ["0"]:
        raise ValueError("Redis Cluster has database 0 only")
    return ClusterUrl(nodes, username, password, scheme.startswith("rediss"))
