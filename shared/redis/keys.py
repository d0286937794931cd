"""The key layout. One place names every key, so docs/architecture.md can list them.

Sessions hash into a fixed number of partitions. Every key of a partition carries
the hash tag `{pN}`, so each script touches one Redis Cluster slot: a session's
head, log and read models, and its partition's feed, counters and tenant index.
"""

from __future__ import annotations

import zlib

PREFIX = "parley"


def partition_of(session_id: str, partitions: int) -> int:
    return zlib.crc32(session_id.encode()) % partitions


class Keys:
    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def tag(self, partition: int) -> str:
        return f"{PREFIX}:{{p{partition}}}"

    def of(self, session_id: str) -> str:
        return self.tag(partition_of(session_id, self.partitions))

    # -- write side (the log): written only by the append script ------------------------
    def head(self, sid: str) -> str:
        """Hash {v: last version, t: tenant}: the expected-version check reads this."""
        return f"{self.of(sid)}:head:{sid}"

    def log(self, sid: str) -> str:
        """Stream: the session's events; entry id `<version>-0`."""
        return f"{self.of(sid)}:log:{sid}"

    def feed(self, partition: int) -> str:
        """Stream: one entry per append naming the session; the projector's consumer group reads it."""
        return f"{self.tag(partition)}:feed"

    def written(self, partition: int) -> str:
        """Hash tenant → events appended in this partition (read-your-writes for lists)."""
        return f"{self.tag(partition)}:written"

    def idempotency(self, partition: int, tenant: str, key_hash: str) -> str:
        return f"{self.tag(partition)}:idem:{tenant}:{key_hash}"

    # -- read side (projections): written only by the projector --------------------------
    def view(self, sid: str) -> str:
        """Hash {v, t, st: state (msgpack), j: session JSON, tools: tool list JSON}."""
        return f"{self.of(sid)}:view:{sid}"

    def messages(self, sid: str) -> str:
        """List of the log versions of the session's `MessageAdded` events, in `seq` order."""
        return f"{self.of(sid)}:msgs:{sid}"

    def index(self, partition: int, tenant: str) -> str:
        """Sorted set of the tenant's live session ids in this partition (all scores 0: UUIDv7 text order)."""
        return f"{self.tag(partition)}:idx:{tenant}"

    def chat(self, sid: str, job_id: str) -> str:
        """Hash: a chat job's record (the `ChatJob` resource's fields; nested ones as JSON)."""
        return f"{self.of(sid)}:chat:{job_id}"

    def chats(self, sid: str) -> str:
        """Sorted set of the session's chat job ids (all scores 0: UUIDv7 text order)."""
        return f"{self.of(sid)}:chats:{sid}"

    def chunks(self, sid: str, job_id: str) -> str:
        """Stream: a chat job's answer as the worker produced it, chunk by chunk, then `done`."""
        return f"{self.of(sid)}:chunks:{job_id}"

    def projected(self, partition: int) -> str:
        """Hash tenant → events projected in this partition."""
        return f"{self.tag(partition)}:projected"

    # -- global ----------------------------------------------------------------------
    config = f"{PREFIX}:{{sys}}:config"
    projectors = f"{PREFIX}:{{sys}}:projectors"
    """Sorted set consumer → last heartbeat (ms): /ready checks a projector is alive."""
    api_keys = f"{PREFIX}:{{auth}}:keys"
    """Hash sha256(key) → tenant."""
    api_key_ids = f"{PREFIX}:{{auth}}:key_ids"
    """Hash key id → sha256(key), so a key can be revoked by its id."""
