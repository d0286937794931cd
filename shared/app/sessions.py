"""The session use cases: create, read, change, delete (or purge) a session; its messages and tools; its event log;
and the stream tokens a browser follows it with.

Writes decide on the session's state and append (`SessionService.execute`), answering domain results the API
encodes; reads answer the read models' pre-encoded JSON, fresh as of the read's start (read-your-writes).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import msgspec

from shared.app.follow import follow
from shared.app.history import History
from shared.app.ports import EventLog, Limits, ReadModels, View, Wakeups
from shared.app.service import Idempotency, SessionService
from shared.domain.commands import (
    AddMessage,
    CreateSession,
    DeleteSession,
    EditMessage,
    ForkSession,
    RemoveMessage,
    UpdateSession,
)
from shared.domain.errors import Contention, Invalid, MessageChanged, NotFound, VersionNotFound
from shared.domain.events import Event, MessageAdded, MessageEdited, MessageRemoved
from shared.domain.fork import MAX_CHAIN
from shared.domain.retention import with_expiry
from shared.domain.search import Position, Query, decode_cursor, encode_cursor, ms
from shared.domain.state import SessionState
from shared.domain.stream_tokens import StreamGrant, sign
from shared.domain.wire import (
    Content,
    ForkRequest,
    Message,
    MessageCreate,
    MessagePatch,
    Session,
    SessionCreate,
    SessionDeletion,
    SessionPatch,
    StreamToken,
    ToolList,
)

__all__ = ["EventsPage", "Sessions"]

MAX_EDIT_ATTEMPTS = 8
"""Times an edit reads its message again because the session changed meanwhile."""
MESSAGE_PAGE, PAGE_OVERLAP = 1000, 16
"""A lookup by id reads the conversation in pages this long; one from the oldest side reaches this far back."""

_encode = msgspec.json.Encoder().encode
_message = msgspec.json.Decoder(Message)
_session_decoder = msgspec.json.Decoder(Session)
_NO_OWN_RETENTION = b'"retention":null,"expires_at":null}'
"""How a projected session without a retention of its own ends (the two last fields of `Session`)."""


def _only(raw: bytes, fields: Sequence[str]) -> bytes:
    """A session's JSON with only these top-level fields."""
    whole = msgspec.json.decode(raw)
    return _encode({f: whole[f] for f in fields if f in whole})


class EventsPage(msgspec.Struct, frozen=True):
    """A page of the log as wire JSON, oldest first; `next`: the `after` of the next page (None: the last)."""

    items: list[bytes]
    next: int | None


class Sessions:
    def __init__(
        self,
        service: SessionService,
        history: History,
        wakeups: Wakeups,
        limits: Limits,
        stream_secret: bytes,
        stream_token_ttl_s: int,
    ) -> None:
        self.service = service
        self.history = history
        self.limits = limits
        """The tenants' retention policies (a session shows when it expires)."""
        self.wakeups = wakeups
        self.stream_secret = stream_secret
        self.stream_token_ttl_s = stream_token_ttl_s

    @property
    def log(self) -> EventLog:
        return self.service.log

    @property
    def views(self) -> ReadModels:
        return self.service.views

    # -- sessions -------------------------------------------------------------------------------
    async def list(self, tenant: str, limit: int, offset: int) -> list[bytes]:
        """The tenant's sessions, newest first (JSON)."""
        return [await self._expiring(tenant, raw) for raw in await self.service.read_sessions(tenant, limit, offset)]

    async def find(
        self, tenant: str, query: Query, after: str | None, limit: int, fields: Sequence[str] | None = None
    ) -> tuple[builtins.list[bytes], str | None]:
        """A page of the tenant's live sessions matching `query`, in its order, and the cursor of the next page
        (None: the last). `after`: a cursor this query gave out; `fields`: only these fields of each session."""
        try:
            start = None if after is None else decode_cursor(query, after)
        except ValueError as e:
            raise Invalid("after is not a cursor this query gave out", {"query": "after"}) from e
        _, raws, nxt = await self.service.read_index(
            lambda: self.views.find(tenant, query, start, limit), lambda r: r[0]
        )
        items = [await self._expiring(tenant, raw) for raw in raws]
        if fields is not None:
            items = [_only(raw, fields) for raw in items]
        return items, None if nxt is None else encode_cursor(query, nxt)

    def cursor_after(self, query: Query, raw: bytes) -> str:
        """The cursor of the page after this session (JSON) in `query`'s order."""
        s = _session_decoder.decode(raw)
        return encode_cursor(query, Position(ms(s.updated_at if query.order == "u" else s.created_at), s.id))

    async def count(self, tenant: str, query: Query) -> tuple[int, bool]:
        """(how many of the tenant's live sessions match, exact: False when the count is a lower bound)."""
        _, n, exact = await self.service.read_index(lambda: self.views.count(tenant, query), lambda r: r[0])
        return n, exact

    async def create(self, tenant: str, body: SessionCreate, idem: Idempotency | None = None) -> tuple[Session, int]:
        """(the new session, its version)."""
        sid = self.service.new_session_id(tenant, idem)
        created, version = await self.service.execute(
            tenant, sid, CreateSession(body=body), _session, idem, tuple[Session, int]
        )
        return with_expiry(created, await self.limits.limits(tenant)), version

    async def _expiring(self, tenant: str, raw: bytes) -> bytes:
        """A session's JSON with `expires_at`, when a retention holds it (else as projected: no decoding)."""
        own = not raw.endswith(_NO_OWN_RETENTION)
        tenant_limits = await self.limits.limits(tenant)
        if not own and not tenant_limits.retention_idle_days:
            return raw
        return _encode(with_expiry(_session_decoder.decode(raw), tenant_limits))

    async def get(self, tenant: str, sid: str, version: int | None = None) -> tuple[bytes, int]:
        """(the session's JSON, its version); at `version`: as it was right after that event."""
        if version is not None:
            state = await self.service.at_version(tenant, sid, version)
            return _encode(state.session), version
        view = await self.service.read(sid, lambda: self.views.session(tenant, sid))
        assert view.body is not None
        return await self._expiring(tenant, view.body), view.version

    async def update(
        self, tenant: str, sid: str, patch: SessionPatch, expected: int | None, idem: Idempotency | None = None
    ) -> tuple[Session, int]:
        """(the session as changed, its version)."""
        command = UpdateSession(patch=patch, expected_version=expected)
        updated, version = await self.service.execute(tenant, sid, command, _session, idem, tuple[Session, int])
        return with_expiry(updated, await self.limits.limits(tenant)), version

    async def delete(
        self, tenant: str, sid: str, expected: int | None, idem: Idempotency | None = None, purge: bool = False
    ) -> SessionDeletion:
        """Delete: the session leaves the read models, the log keeps `SessionDeleted`. `purge`: erase the log and
        everything derived from it too (a deleted session's as well), leaving a tombstone in the audit stream."""
        if purge:
            deleted_at = await self.history.purge(tenant, sid, expected, idem)
            return SessionDeletion(id=sid, deleted_at=deleted_at, purged=True)

        def deletion(_: SessionState, events: builtins.list[Event]) -> SessionDeletion:
            return SessionDeletion(id=sid, deleted_at=events[0].occurred_at)

        before = await self.log.load(tenant, sid)
        done = await self.service.execute(
            tenant, sid, DeleteSession(expected_version=expected), deletion, idem, SessionDeletion
        )
        if before is not None:
            await self.history.end_chats(before)
        return done

    async def fork(
        self, tenant: str, parent_id: str, body: ForkRequest, idem: Idempotency | None = None
    ) -> tuple[Session, int]:
        """(the fork, its version): a new session whose history is the parent's up to `body.version` (its latest
        by default), which the fork's log reads from the parent's (`shared.domain.fork`, copy-on-write). Deciding
        it reads the parent's state at that version (a snapshot and the events after it), not its history."""
        parent = await self.log.load(tenant, parent_id)
        if parent is None:
            raise NotFound(f"session {parent_id} not found")
        version = body.version or parent.version
        if version > parent.version:
            raise VersionNotFound(f"session {parent_id} has no version {version} (its latest is {parent.version})")
        if version < parent.version:
            _, past = await self.log.at_version(tenant, parent_id, version)
            if past is None:
                raise NotFound(f"session {parent_id} not found")  # purged meanwhile
            parent = past
        events: builtins.list[Event] = []
        if parent.forked_from is not None and await self.log.fork_depth(parent_id, MAX_CHAIN) >= MAX_CHAIN:
            while len(events) < version:  # deeper, a read would walk too many parents: this fork stores its own
                page = await self.log.read(parent_id, len(events), min(1_000, version - len(events)))
                if not page:
                    raise NotFound(f"session {parent_id} not found")  # purged meanwhile
                events += page
        child = self.service.new_session_id(tenant, idem, parent_id)
        command = ForkSession(parent=parent, events=tuple(events), metadata=body.metadata)
        try:
            forked, at = await self.service.execute(tenant, child, command, _session, idem, tuple[Session, int])
        except NotFound as e:  # the parent was purged meanwhile (the fork's append checks it)
            raise NotFound(f"session {parent_id} not found") from e
        return with_expiry(forked, await self.limits.limits(tenant)), at

    async def forks(self, tenant: str, parent_id: str) -> builtins.list[bytes]:
        """The sessions forked from this one (JSON, oldest first; deleted ones left out)."""
        if await self.log.load(tenant, parent_id) is None:
            raise NotFound(f"session {parent_id} not found")
        out = []
        for sid in await self.views.forks(parent_id):
            try:
                out.append((await self.get(tenant, sid))[0])
            except NotFound:  # deleted, purged, or (never) another tenant's
                continue
        return out

    async def tools(self, tenant: str, sid: str, version: int | None = None) -> bytes:
        if version is not None:
            state = await self.service.at_version(tenant, sid, version)
            assert state.session is not None
            return _encode(ToolList(state.session.tools))
        view = await self.service.read(sid, lambda: self.views.tools(tenant, sid))
        assert view.body is not None
        return view.body

    # -- messages -----------------------------------------------------------------------------
    async def add_message(self, tenant: str, sid: str, body: MessageCreate, idem: Idempotency | None = None) -> Message:
        return await self.service.execute(tenant, sid, AddMessage(body=body), _added, idem, Message)

    async def messages(
        self, tenant: str, sid: str, limit: int, offset: int, version: int | None = None
    ) -> builtins.list[bytes]:
        """The conversation (JSON), oldest first, each message as it is now, but for those a `keep_messages`
        retention hides; at `version`: every message as it was then."""
        if version is not None:
            count = (await self.service.at_version(tenant, sid, version)).message_count
            view = await self.service.read_past(
                sid, lambda: self.views.messages(tenant, sid, limit, offset, count, version), version
            )
            return view.items or []
        keep = (await self.limits.limits(tenant)).retention_keep_messages
        return (await self._page(tenant, sid, limit, offset, keep)).items or []

    async def _page(self, tenant: str, sid: str, limit: int, offset: int, keep: int | None) -> View:
        """A page of the conversation as it is now (`View.items`), fresh as of the read's start."""
        return await self.service.read(sid, lambda: self.views.messages(tenant, sid, limit, offset, keep_messages=keep))

    async def message(self, tenant: str, sid: str, message_id: str) -> Message:
        """One message as it is now (not a removed one; one a retention hides from the list is still found)."""
        return (await self._message_at(tenant, sid, message_id))[0]

    async def _message_at(self, tenant: str, sid: str, message_id: str) -> tuple[Message, int]:
        """The message, and the session's version its read model was at when it was read.

        Found by its id in pages of the conversation (never across sessions), from both ends inwards, the newest
        page first: the message a client edits or reads back is most often a recent one, and the first ones are
        found as soon; one in the middle of a long session costs the most. Positions count the messages shown: one
        added meanwhile moves none; one removed moves those after it down by one, so a page from the oldest side
        starts a little before where the last one ended."""
        state = await self.service.current(tenant, sid)
        if not state.exists:
            raise NotFound(f"session {sid} not found")
        needle = b'"id":"%s"' % message_id.encode()
        low, high = 0, state.message_count - len(state.removed)  # the positions not looked at yet
        newest = True
        while low < high:
            if newest:
                start, stop = max(low, high - MESSAGE_PAGE), high
                high = start
            else:
                start, stop = max(0, low - PAGE_OVERLAP), min(low + MESSAGE_PAGE, high)
                low = stop
            newest = not newest
            view = await self._page(tenant, sid, stop - start, start, None)
            for raw in view.items or []:
                if needle in raw and (m := _message.decode(raw)).id == message_id:
                    return m, view.version
        raise NotFound(f"message {message_id} not found")

    async def edit_message(
        self, tenant: str, sid: str, message_id: str, patch: MessagePatch, idem: Idempotency | None = None
    ) -> Message:
        """The patch applies to the message as it is when written: one read before a change of the session made
        meanwhile (another edit of it, say) is read again, so two edits of its fields made at once both stick."""
        for _ in range(MAX_EDIT_ATTEMPTS):
            current, read_at = await self._message_at(tenant, sid, message_id)
            content: Content | None = current.content if patch.content is msgspec.UNSET else patch.content
            command = EditMessage(message=current, content=content, name=patch.name, read_at=read_at)

            def edited(_: SessionState, events: builtins.list[Event], current: Message = current) -> Message:
                if not events:  # it changes nothing: nothing was written
                    return current
                assert isinstance(events[0], MessageEdited)
                return events[0].data

            try:
                return await self.service.execute(tenant, sid, command, edited, idem, Message)
            except MessageChanged:
                continue
        raise Contention(f"session {sid} kept changing while message {message_id} was edited; retry")

    async def remove_message(self, tenant: str, sid: str, message_id: str, idem: Idempotency | None = None) -> Message:
        current = await self.message(tenant, sid, message_id)

        def removed(_: SessionState, events: builtins.list[Event]) -> Message:
            assert isinstance(events[0], MessageRemoved)
            return current

        return await self.service.execute(tenant, sid, RemoveMessage(message=current), removed, idem, Message)

    # -- the log --------------------------------------------------------------------------------
    async def events(self, tenant: str, sid: str, after: int, limit: int) -> EventsPage:
        """Up to `limit` events after version `after`, straight from the log (always fresh)."""
        view = await self.log.events(tenant, sid, after, limit)
        if view.head == 0:
            raise NotFound(f"session {sid} not found")
        items = view.items or []
        last = after + len(items)
        return EventsPage(items, last if items and last < view.head else None)

    async def seen_to_the_end(self, tenant: str, sid: str, after: int) -> bool:
        """Whether a reader who saw the log up to version `after` saw all there will ever be: the session's last
        event, `SessionDeleted`. NotFound for no such session (or a purged one)."""
        view = await self.log.events(tenant, sid, after, 1)
        if view.head == 0:
            raise NotFound(f"session {sid} not found")
        if after < view.head:
            return False
        last = (await self.log.events(tenant, sid, view.head - 1, 1)).items or []
        return bool(last) and last[0].startswith(b'{"type":"SessionDeleted"')

    def follow_events(
        self, tenant: str, sid: str, after: int, keepalive_s: float, batch: int = 500
    ) -> AsyncIterator[Sequence[bytes]]:
        """The log after `after`, batch by batch as it grows (an empty batch: quiet for `keepalive_s`). Ends when
        the session is purged."""
        cursor = after

        async def fetch() -> builtins.list[bytes]:
            nonlocal cursor
            view = await self.log.events(tenant, sid, cursor, batch)
            if view.head == 0:
                raise _Purged()
            items = view.items or []
            cursor += len(items)
            return items

        return _until_purged(follow(self.wakeups, "appends", sid, sid, fetch, keepalive_s))

    # -- stream tokens -------------------------------------------------------------------------
    async def stream_token(self, tenant: str, sid: str, ttl_s: int | None) -> StreamToken:
        """A short-lived, read-only token for this session's event streams (a browser's EventSource)."""
        if not self.stream_secret:
            raise RuntimeError("this process was not started to serve the API: it holds no stream token key")
        await self.service.read(sid, lambda: self.views.session(tenant, sid))  # NotFound for other tenants' too
        expires = int(time.time()) + (ttl_s or self.stream_token_ttl_s)
        token = sign(self.stream_secret, StreamGrant(tenant, sid, expires))
        return StreamToken(token=token, session_id=sid, expires_at=datetime.fromtimestamp(expires, UTC))


class _Purged(Exception):
    """The session's log is gone: its stream ends."""


async def _until_purged(batches: AsyncIterator[Sequence[bytes]]) -> AsyncIterator[Sequence[bytes]]:
    try:
        async for batch in batches:
            yield batch
    except _Purged:
        return


def _session(state: SessionState, _: list[Event]) -> tuple[Session, int]:
    assert state.session is not None
    return state.session, state.version


def _added(_: SessionState, events: list[Event]) -> Message:
    event = events[0]
    assert isinstance(event, MessageAdded)
    return event.data
