"""The one script registry: every Lua script of the Redis adapters, each one atomic step of the design in one
Redis Cluster slot. The sources are `lua/<name>.lua`; each names its KEYS and ARGV at the top. No shared Lua
helpers: each script is whole in its file, so what runs in Redis is exactly what the file says."""

from __future__ import annotations

from shared.adapters.redis.lua import Registry, Script

__all__ = [
    "ADMIT",
    "APPEND",
    "APPLY",
    "CHUNKS",
    "ENQUEUE",
    "FIND",
    "KEY_CREATE",
    "KEY_REVOKE",
    "LOAD",
    "MARK_RUNNING",
    "PURGE",
    "READ_CHAT",
    "READ_EVENTS",
    "READ_MESSAGES",
    "READ_VIEW",
    "REGISTRY",
    "SET_LIMITS",
    "START_JOB",
    "SWITCH",
    "TAKE_SLOT",
    "TIME_TRAVEL",
    "TRIM",
    "WEBHOOK_ADVANCE",
    "WEBHOOK_CREATE",
    "WEBHOOK_DELETE",
    "WEBHOOK_LEASE",
    "WEBHOOK_RECORD",
    "WEBHOOK_RELEASE",
    "WEBHOOK_REPLAY",
    "WEBHOOK_UPDATE",
]

REGISTRY = Registry()


def _s(name: str) -> Script:
    return REGISTRY.script(name)


APPEND = _s("append")
LOAD = _s("load")
APPLY = _s("apply")
READ_MESSAGES = _s("read_messages")
READ_VIEW = _s("read_view")
READ_EVENTS = _s("read_events")
READ_CHAT = _s("read_chat")
TIME_TRAVEL = _s("time_travel")
TRIM = _s("trim")
SWITCH = _s("switch")
FIND = _s("find")
PURGE = _s("purge")
MARK_RUNNING = _s("mark_running")
CHUNKS = _s("chunks")
ENQUEUE = _s("enqueue")
START_JOB = _s("start_job")
ADMIT = _s("admit")
TAKE_SLOT = _s("take_slot")
SET_LIMITS = _s("set_limits")
KEY_CREATE = _s("key_create")
KEY_REVOKE = _s("key_revoke")
WEBHOOK_CREATE = _s("webhook_create")
WEBHOOK_UPDATE = _s("webhook_update")
WEBHOOK_DELETE = _s("webhook_delete")
WEBHOOK_REPLAY = _s("webhook_replay")
WEBHOOK_ADVANCE = _s("webhook_advance")
WEBHOOK_RECORD = _s("webhook_record")
WEBHOOK_LEASE = _s("webhook_lease")
WEBHOOK_RELEASE = _s("webhook_release")
