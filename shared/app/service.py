"""The service layer: load state, decide, append; and read with read-your-writes.

Plain async functions over the ports, so the API (and later the chat worker)
run the same write path, and unit tests can drive it against fakeredis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import msgspec

from shared.app.ports import (
    Appended,
    Conflict,
    EventLog,
    Forked,
    Freshness,
    IdempotencyClaim,
    IdempotencyMismatch,
    Missing,
    PurgeConflict,
    ReadModels,
    Replayed,
    View,
)
from shared.domain.commands import Command, CreateSession, DeleteSession, ForkSession, Limits, Stamp, decide
from shared.domain.errors import (
    Contention,
    DomainError,
    IdempotencyKeyReused,
    Invalid,
    NotFound,
    ProjectionLagging,
    VersionNotFound,
)
from shared.domain.events import Event, check_readable
from shared.domain.fork import forked_state
from shared.domain.ids import partition_of, uuid7
from shared.domain.state import SessionState, fold

MAX_ATTEMPTS = 16
"""Decisions a write makes before it gives up with `Contention` (409): each race lost to another process's writer
of the session costs one (in-process writers of a session queue on its lock instead). A process starved of CPU
while another writes the same session every few milliseconds lost eight in a row about once in 10,000 writes
(benchmark row P9api, 20 sessions written by two API processes on 2 cores)."""
T = TypeVar("T")
R = TypeVar("R")


class Projection(Protocol):
    """What a reader that waited too long may run itself: the projector's catch-up (`services.worker.projector`)."""

    async def catch_up(self, session_ids: Iterable[str]) -> None: ...

    async def catch_up_partitions(self, partitions: Iterable[int]) -> None: ...


Decision = Callable[[SessionState, list[Event]], R]
"""What a use case makes of a decision: the state after the events, and the events (none: nothing to do)."""

_encode = msgspec.json.Encoder().encode


class Idempotency(msgspec.Struct, frozen=True):
    key: str
    request_hash: str

    @classmethod
    def of(cls, key: str, method: str, path: str, body: bytes) -> Idempotency:
        digest = hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()
        return cls(hashlib.sha256(key.encode()).hexdigest()[:32], digest)


class StateCache:
    """A small LRU of (tenant, session) → state, so a warm write is one Redis round trip."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], SessionState] = OrderedDict()

    def get(self, tenant: str, sid: str) -> SessionState | None:
        key = (tenant, sid)
        state = self._items.get(key)
        if state is not None:
            self._items.move_to_end(key)
        return state

    def put(self, tenant: str, state: SessionState) -> None:
        key = (tenant, state.id)
        current = self._items.get(key)
        if current is None or current.version <= state.version:
            self._items[key] = state
            self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, tenant: str, sid: str) -> None:
        self._items.pop((tenant, sid), None)


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or awaits it.

    Writes to one session from one process queue behind each other instead of racing to a
    version conflict and a reload; conflicts remain only between processes.
    """

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class SessionService:
    def __init__(
        self,
        log: EventLog,
        views: ReadModels,
        partitions: int,
        limits: Limits = Limits(),
        read_timeout_s: float = 2.0,
        cache_size: int = 10_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_id: Callable[[], str] = uuid7,
        projection: Projection | None = None,
        read_assist_s: float = 0.5,
    ) -> None:
        """`projection`: catches read models up in this process when a read has waited `read_assist_s` for the
        projector (None: reads only wait)."""
        self.log = log
        self.views = views
        self.partitions = partitions
        self.limits = limits
        self.read_timeout_s = read_timeout_s
        self.cache = StateCache(cache_size)
        self.clock = clock
        self.new_id = new_id
        self.locks = KeyedLocks()
        self.projection = projection
        self.read_assist_s = read_assist_s
        self._assisting: dict[str, asyncio.Future[None]] = {}

    def new_session_id(self, tenant: str, idempotency: Idempotency | None, parent_id: str | None = None) -> str:
        """A fresh id; a fork's in its parent's partition (it reads its parent's log, in one Cluster slot), else
        with an Idempotency-Key one in the partition the key's record lives in (a fork's record lives in the
        fork's, so its parent's, partition)."""
        sid = self.new_id()
        if parent_id is not None:
            target = partition_of(parent_id, self.partitions)
        elif idempotency is not None:
            target = partition_of(f"{tenant}:{idempotency.key}", self.partitions)
        else:
            return sid
        while partition_of(sid, self.partitions) != target:
            sid = self.new_id()
        return sid

    async def execute(
        self,
        tenant: str,
        session_id: str,
        command: Command,
        result: Decision[R],
        idempotency: Idempotency | None = None,
        result_type: type[R] | None = None,
    ) -> R:
        """Decide on the freshest state we have and append with an expected-version check; retry on conflict.

        Answers `result(state after, events)`. With an Idempotency-Key that result (a msgspec type, `result_type`)
        is stored with the append, atomically; a retry gets the stored one back and appends nothing."""
        if idempotency is not None and result_type is None:
            raise TypeError("an idempotent write needs the result's type, to give a replay back")
        async with self.locks.hold((tenant, session_id)):
            return await self._execute(tenant, session_id, command, result, idempotency, result_type)

    async def _execute(
        self,
        tenant: str,
        session_id: str,
        command: Command,
        result: Decision[R],
        idempotency: Idempotency | None,
        result_type: type[R] | None,
    ) -> R:
        state = self.cache.get(tenant, session_id)
        fresh = state is None
        if isinstance(command, (CreateSession, ForkSession)):
            state, fresh = SessionState(id=session_id), True
        elif state is None:
            state = await self.log.load(tenant, session_id)
            if state is None:
                raise NotFound(f"session {session_id} not found")
        for _ in range(MAX_ATTEMPTS):
            try:
                events = decide(state, command, Stamp(now=self.clock(), new_id=self.new_id), self.limits)
            except DomainError:
                if (
                    idempotency is not None
                    and (replay := await self._replay(tenant, session_id, idempotency)) is not None
                ):
                    return msgspec.json.decode(replay, type=result_type)
                if fresh:
                    raise
                state, fresh = await self._reload(tenant, state), True
                continue
            if not events and not fresh:  # "nothing to do" may only mean our cached state is stale
                state, fresh = await self._reload(tenant, state), True
                continue
            for event in events:
                try:
                    check_readable(event)
                except msgspec.ValidationError as e:
                    raise Invalid(f"the request would store an event the log cannot read back: {e}") from e
            inherits = None
            if isinstance(command, ForkSession) and not command.events:  # copy-on-write: reads its parent's log
                if not self._near(session_id, command.parent.id):
                    raise ValueError(f"a copy-on-write fork of {command.parent.id} needs an id in its partition")
                inherits = (command.parent.id, command.parent.version + 1)
                after = forked_state(command.parent, events, session_id)
            else:
                after = fold(state, events)
            answer = result(after, events)
            if not events:  # nothing to write, so nothing records the key: one it already records must match
                if idempotency is not None and (replay := await self._replay(tenant, session_id, idempotency)):
                    return msgspec.json.decode(replay, type=result_type)
                return answer
            claim = None
            if idempotency is not None:
                claim = IdempotencyClaim(
                    key=idempotency.key, request_hash=idempotency.request_hash, response=_encode(answer)
                )
            purging = isinstance(command, DeleteSession) and command.purge
            match await self.log.append(tenant, session_id, state.version, events, claim, inherits, purging):
                case Appended():
                    self.cache.put(tenant, after)
                    return answer
                case Replayed(response=raw):
                    return msgspec.json.decode(raw, type=result_type)
                case IdempotencyMismatch():
                    raise IdempotencyKeyReused("this Idempotency-Key was used with a different request")
                case Missing():
                    raise NotFound(f"session {session_id} not found")
                case Forked(forks=n):
                    raise PurgeConflict(f"session {session_id} has {n} forks reading its log")
                case Conflict(version=head, newer=newer):
                    if newer and len(newer) == head - state.version and newer[0].version == state.version + 1:
                        state, fresh = fold(state, newer), True  # what we missed came back with the refusal
                        self.cache.put(tenant, state)
                    else:
                        state, fresh = await self._reload(tenant, state), True
        raise Contention(f"session {session_id} is changing too fast; retry")

    def _near(self, session_id: str, parent_id: str) -> bool:
        """A fork reads its parent's log only from the parent's partition (one Cluster slot: `new_session_id`)."""
        return partition_of(session_id, self.partitions) == partition_of(parent_id, self.partitions)

    def forget(self, tenant: str, session_id: str) -> None:
        """Drop what this process remembers of a session (after a purge, nothing of it may stay)."""
        self.cache.drop(tenant, session_id)

    async def current(self, tenant: str, session_id: str) -> SessionState:
        """The session's state at its last event, whatever the projector has reached: its cached state and the
        log's tail in one round trip. NotFound if it never was, or was purged (a deleted one is returned)."""
        known = self.cache.get(tenant, session_id)
        return await self._reload(tenant, known if known is not None else SessionState(id=session_id))

    async def _reload(self, tenant: str, known: SessionState) -> SessionState:
        state = await self.log.load(tenant, known.id, known if known.version else None)
        if state is None:
            raise NotFound(f"session {known.id} not found")
        self.cache.put(tenant, state)
        return state

    async def replayed(self, tenant: str, session_id: str, idempotency: Idempotency, result_type: type[R]) -> R | None:
        """The stored result of an idempotent write already made, or None: for a use case that must know before it
        takes something a replay would not give back (a chat's slot under the tenant's limits)."""
        raw = await self._replay(tenant, session_id, idempotency)
        return None if raw is None else msgspec.json.decode(raw, type=result_type)

    async def _replay(self, tenant: str, session_id: str, idempotency: Idempotency) -> bytes | None:
        """The stored result of an idempotent write, or None if the key is unused."""
        raw = await self.log.recall(tenant, session_id, idempotency.key, idempotency.request_hash)
        if raw == b"":
            raise IdempotencyKeyReused("this Idempotency-Key was used with a different request")
        return raw

    # -- reads ------------------------------------------------------------------------
    async def at_version(self, tenant: str, session_id: str, version: int) -> SessionState:
        """The state right after event `version`, folded from the log (fresh by construction)."""
        head, state = await self.log.at_version(tenant, session_id, version)
        if head == 0:
            raise NotFound(f"session {session_id} not found")
        if state is None or version == 0:
            raise VersionNotFound(f"session {session_id} has no version {version}", {"version": version})
        if not state.exists:
            raise NotFound(f"session {session_id} was deleted at version {version}", {"version": version})
        return state

    async def read_past(self, session_id: str, fetch: Callable[[], Awaitable[View]], version: int) -> View:
        """Like `read`, waiting until the read models hold `version` (time travel reads their message pointers)."""
        view = await self._fresh(
            fetch, lambda v: v.head == 0 or v.version >= version, lambda: self._assist([session_id])
        )
        if view is None:
            raise ProjectionLagging("the read model is behind the version asked for; retry shortly")
        if view.head == 0:
            raise NotFound("session not found")
        return view

    async def read(self, session_id: str, fetch: Callable[[], Awaitable[View]], catch_up: bool = False) -> View:
        """Wait (bounded) until the read model holds every write acknowledged before this read began.

        `catch_up`: do not wait for the projector, catch the session up here at once if it is behind (a chat job
        reads its conversation right after the writes that asked for it: waiting would add the projector's lag,
        and a poll's, to every chat; the projection's version check makes projecting twice harmless)."""
        target: list[int] = []  # the head the first fetch saw: later writes do not hold this read back

        def caught_up(v: View) -> bool:
            if not target:
                target.append(v.head)
            return v.head == 0 or v.version >= target[0]

        view = await self._fresh(
            fetch, caught_up, lambda: self._assist([session_id]), assist_after_s=0.0 if catch_up else None
        )
        if view is None:
            raise ProjectionLagging("the read model is behind the last acknowledged write; retry shortly")
        if view.head == 0 or view.body is None:
            raise NotFound("session not found")
        return view

    async def read_sessions(self, tenant: str, limit: int, offset: int) -> list[bytes]:
        """A page of the tenant's session index, newest first, fresh as of the read's start."""
        page = await self.read_index(lambda: self.views.sessions(tenant, limit, offset), lambda p: p[0])
        return page[1]

    async def read_index(self, fetch: Callable[[], Awaitable[T]], freshness: Callable[[T], Freshness]) -> T:
        """A read of the tenant's session index (a page, `find`, `count`), fresh as of its start: polled until every
        partition has projected the tenant's writes its first fetch saw acknowledged."""
        start: list[Freshness] = []
        behind: list[int] = []

        def caught_up(result: T) -> bool:
            fresh = freshness(result)
            if not start:
                start.append(fresh)
            behind[:] = fresh.behind(start[0])
            return not behind

        result = await self._fresh(fetch, caught_up, lambda: self._assist_partitions(list(behind)))
        if result is None:
            raise ProjectionLagging("the session index is behind the last acknowledged write; retry shortly")
        return result

    async def _fresh(
        self,
        fetch: Callable[[], Awaitable[T]],
        caught_up: Callable[[T], bool],
        assist: Callable[[], Awaitable[None]],
        assist_after_s: float | None = None,
    ) -> T | None:
        """Poll `fetch` with a short backoff until `caught_up`, or None after `read_timeout_s`. After
        `assist_after_s` (default `read_assist_s`) of waiting, `assist` catches the read models up in this process
        (once): a dead or overloaded worker then delays a read by about that long instead of failing it."""
        start = time.monotonic()
        deadline = start + self.read_timeout_s
        assist_after_s = self.read_assist_s if assist_after_s is None else assist_after_s
        assisted = self.projection is None
        delay = 0.0005
        while True:
            result = await fetch()
            if caught_up(result):
                return result
            now = time.monotonic()
            if now >= deadline:
                return None
            if not assisted and now - start >= assist_after_s:
                assisted = True
                await assist()
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def _assist(self, session_ids: list[str]) -> None:
        """Catch these sessions up here, sharing one catch-up per session among concurrent readers."""
        assert self.projection is not None
        waits = {running for sid in session_ids if (running := self._assisting.get(sid)) is not None}
        todo = [sid for sid in session_ids if sid not in self._assisting]
        if todo:
            task = asyncio.ensure_future(self.projection.catch_up(todo))
            for sid in todo:
                self._assisting[sid] = task
            task.add_done_callback(lambda _: [self._assisting.pop(sid, None) for sid in todo])
            waits.add(task)
        for running in waits:
            await asyncio.shield(running)  # a reader that gives up does not cancel the others' catch-up

    async def _assist_partitions(self, partitions: list[int]) -> None:
        assert self.projection is not None
        await self.projection.catch_up_partitions(partitions)
