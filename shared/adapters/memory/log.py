"""The event log in memory (the `EventLog` port), with the Redis APPEND's promises.

An append is atomic (no await inside it): the idempotency record is checked first (a replay answers the stored
response, another request `IdempotencyMismatch`), then the tenant and the expected version; a repeat of an append
that landed (its first event sits at `expected + 1`) answers `Appended` once more and writes nothing. Each append
feeds the projector (its partition's feed) and wakes whoever follows the session.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.adapters.codec import decode_event, decode_state, event_json, log_fields
from shared.adapters.forks import checked
from shared.adapters.memory.store import Head, Memory
from shared.app.ports import (
    CONFLICT_TAIL,
    Appended,
    AppendOutcome,
    Conflict,
    Forked,
    IdempotencyClaim,
    IdempotencyMismatch,
    Missing,
    Pending,
    Replayed,
    View,
)
from shared.domain.events import Event
from shared.domain.projection import SNAPSHOT_EVERY
from shared.domain.state import SessionState, fold

__all__ = ["LOAD_BATCH", "MemoryEventLog", "tail"]

LOAD_BATCH = 500
"""Events per load step, as in Redis: a longer tail is folded in several steps."""


def tail(memory: Memory, session_id: str, known: SessionState | None, gen: int | None = None) -> Pending | None:
    """The Redis LOAD: the newer of `known` and the view's state (in `gen`, else the live generation) and up to
    `LOAD_BATCH` events after it; None for no such session."""
    head = memory.heads.get(session_id)
    if head is None:
        return None
    base = known.version if known is not None else 0
    generation = memory.peek_generation(session_id, head.gen if gen is None else gen)
    state = known or SessionState(id=session_id)
    if generation is not None and generation.view.version > base and generation.view.state is not None:
        base, state = generation.view.version, decode_state(generation.view.state)
    entries = memory.entries(session_id, base, LOAD_BATCH) if head.version > base else []
    events = [decode_event(v, fields) for v, fields in entries]
    return Pending(tenant=head.tenant, state=state, events=events, head=head.version)


class MemoryEventLog:
    def __init__(self, memory: Memory, idempotency_ttl_s: int = 86_400) -> None:
        self.memory = memory
        self.idempotency_ttl_s = idempotency_ttl_s

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_version: int,
        events: Sequence[Event],
        claim: IdempotencyClaim | None = None,
        inherits: tuple[str, int] | None = None,
        purging: bool = False,
    ) -> AppendOutcome:
        if not events:
            raise ValueError("an append needs at least one event")  # a head without events would be no session
        m = self.memory
        partition = m.partition(session_id)
        record_key = (partition, tenant, claim.key) if claim else None
        if record_key is not None and claim is not None:
            record = m.idempotency.get(record_key)
            if record is not None:
                return Replayed(record[1]) if record[0] == claim.request_hash else IdempotencyMismatch()
        head = m.heads.get(session_id)
        if head is not None and head.tenant != tenant:
            return Missing()
        version = head.version if head is not None else 0
        log = m.logs.get(session_id, [])
        fork = checked(events, inherits, partition, m.partition)
        if version != expected_version:
            # a retry of an append that did land (its reply was lost): our first event sits at expected + 1
            mine = log[expected_version] if 0 <= expected_version < len(log) else None
            if mine is not None and mine[b"i"] == events[0].id.encode():
                return Appended(expected_version + len(events) + (fork[1] - 1 if fork else 0))
            newer = (
                m.entries(session_id, expected_version, CONFLICT_TAIL)
                if 0 <= version - expected_version <= CONFLICT_TAIL
                else []
            )
            return Conflict(version, tuple(decode_event(v, f) for v, f in newer))
        # encode all first: a bad event writes nothing
        fields: list[dict[bytes, bytes] | None] = [log_fields(e) for e in events]
        if fork is not None:
            parent = m.heads.get(fork[0])
            if parent is None or parent.tenant != tenant or parent.version < fork[1] - 1 or parent.purging:
                return Missing()
        if purging and (forks := len(m.readers.get(session_id, ()))):
            return Forked(forks)
        if fork is not None:
            fields[1:1] = [None] * (fork[1] - 1)
            m.readers.setdefault(fork[0], set()).add(session_id)
        m.logs.setdefault(session_id, []).extend(fields)
        version += len(fields)
        if head is None:
            m.heads[session_id] = head = Head(version, tenant, fork=fork)
        head.version = version
        head.purging = head.purging or purging
        m.written[(partition, tenant)] = m.written.get((partition, tenant), 0) + len(fields)
        m.feeds[partition].stream.add(session_id, m.clock())
        if expected_version == 0:
            m.registry.setdefault((partition, tenant), set()).add(session_id)
        if record_key is not None and claim is not None:
            m.idempotency.set(record_key, (claim.request_hash, claim.response))
            m.idempotency.expire(record_key, self.idempotency_ttl_s)
            m.idempotency_of.setdefault(session_id, set()).add(record_key)
        m.signal("feed")
        m.wake(session_id)
        return Appended(version)

    async def load(self, tenant: str, session_id: str, known: SessionState | None = None) -> SessionState | None:
        state = known
        while True:
            pending = tail(self.memory, session_id, state)
            if pending is None or pending.tenant != tenant:
                return None
            if state is not None and pending.head < state.version:  # purged and imported again: what we knew is void
                state = None
                continue
            state = fold(pending.state, pending.events)
            if state.version >= pending.head:
                return state

    async def recall(self, tenant: str, session_id: str, key: str, request_hash: str) -> bytes | None:
        record = self.memory.idempotency.get((self.memory.partition(session_id), tenant, key))
        if record is None:
            return None
        return record[1] if record[0] == request_hash else b""

    async def fork_depth(self, session_id: str, limit: int) -> int:
        depth, head = 0, self.memory.heads.get(session_id)
        while depth < limit and head is not None and head.fork is not None:
            depth, head = depth + 1, self.memory.heads.get(head.fork[0])
        return depth

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        return [decode_event(v, fields) for v, fields in self.memory.entries(session_id, after, limit)]

    async def events(self, tenant: str, session_id: str, after: int, limit: int) -> View:
        head = self.memory.head_of(tenant, session_id)
        if head is None:
            return View(0, 0, None)
        if after >= head.version:
            return View(head.version, head.version, b"log", [])
        entries = self.memory.entries(session_id, after, limit)
        return View(head.version, head.version, b"log", [event_json(v, f) for v, f in entries])

    async def at_version(self, tenant: str, session_id: str, version: int) -> tuple[int, SessionState | None]:
        head = self.memory.head_of(tenant, session_id)
        if head is None:
            return 0, None
        if version > head.version:
            return head.version, None
        generation = self.memory.peek_generation(session_id, head.gen)
        snapshots = generation.snapshots if generation is not None else {}
        base = version - version % SNAPSHOT_EVERY
        while base > 0 and base not in snapshots:
            base -= SNAPSHOT_EVERY
        state = decode_state(snapshots[base]) if base > 0 else SessionState(id=session_id)
        entries = self.memory.entries(session_id, base, version - max(base, 0))
        return head.version, fold(state, (decode_event(v, f) for v, f in entries))
