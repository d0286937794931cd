"""UUIDv7 ids: time-ordered, so the newest-first index can sort ids by their text."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
import zlib

_lock = threading.Lock()
_last_ms = 0
_seq = 0


def uuid7() -> str:
    """A UUIDv7 string, monotonic within this process (a 12-bit counter orders ids of one millisecond)."""
    global _last_ms, _seq
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        else:
            _last_ms, _seq = ms, int.from_bytes(os.urandom(2), "big") & 0x3FF
        seq = _seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    h = "%032x" % ((ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_uuid(text: str) -> str | None:
    """The canonical lowercase form of a UUID string, or None if `text` is not one."""
    if len(text) != 36:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def derived_id(base: str, purpose: str) -> str:
    """A UUIDv7 fixed by (`base`, `purpose`): `base`'s time, random bits from a hash.

    A chat job run twice derives the same ids for its answer, so the second append is
    recognisably the same answer, never a new one.
    """
    digest = int.from_bytes(hashlib.sha256(f"{base}/{purpose}".encode()).digest()[:10], "big")
    head = base.replace("-", "")[:12]
    h = head + "7" + "%03x" % (digest >> 68 & 0xFFF) + "%016x" % (0b10 << 62 | digest & ((1 << 62) - 1))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def partition_of(key: str, partitions: int) -> int:
    """The partition (of `partitions`) a session id, or an idempotency key, hashes into (CRC32)."""
    return zlib.crc32(key.encode()) % partitions


def key_hash(api_key: str) -> str:
    """What is stored of an API key: its SHA-256, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id(api_key: str) -> str:
    """An API key's public id (the first 12 hex digits of its hash): what lists show and revoke accepts."""
    return key_hash(api_key)[:12]
