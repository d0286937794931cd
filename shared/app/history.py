"""The history use cases: export and import a session's log, purge (erase) sessions, the audit stream of purges.

An export is NDJSON: one header line, then each event as the `/events` API shows it.
Import validates the whole log with the pure fold before writing anything, then
appends it in one atomic script as if the session were created with all of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime

import msgspec

from shared.app.ports import Appended, ChatJobs, LogAdmin, PurgeConflict
from shared.app.service import Idempotency, SessionService
from shared.domain.commands import DeleteSession
from shared.domain.errors import (
    Contention,
    HasForks,
    Invalid,
    InvalidImport,
    NotFound,
    SessionExists,
    VersionConflict,
)
from shared.domain.events import SCHEMA_VERSION, Event, SessionDeleted, SessionPurged, SessionPurgedData
from shared.domain.ids import parse_uuid, uuid7
from shared.domain.state import SessionState, fold
from shared.domain.upcast import upcast

__all__ = ["ExportHeader", "History", "export_lines", "import_sessions", "parse_export", "purge", "sessions_of_user"]

FORMAT = "parley.session"
SESSION_DELETED = b'{"code":"session_deleted","message":"the session was deleted"}'
EXPORT_BATCH = 1_000


class ExportHeader(msgspec.Struct, kw_only=True, omit_defaults=False):
    format: str = FORMAT
    schema: int = SCHEMA_VERSION
    """The schema of the events' `data` below; import upcasts older ones."""
    session_id: str
    events: int


_event = msgspec.json.Decoder(Event)
_header = msgspec.json.Decoder(ExportHeader)
_any = msgspec.json.Decoder()
_msgpack = msgspec.msgpack.Encoder().encode
_encode = msgspec.json.Encoder().encode


class _Done(msgspec.Struct):
    """What a purge's delete stores for its Idempotency-Key: that it was made (the purge's answer comes after)."""


async def export_lines(admin: LogAdmin, session_id: str) -> AsyncIterator[bytes]:
    """The session's log up to its version when the export began, as NDJSON lines (each ends in a newline)."""
    head, tenant, _ = await admin.head(session_id)
    if tenant is None:
        raise NotFound(f"session {session_id} not found")
    yield _encode(ExportHeader(session_id=session_id, events=head)) + b"\n"
    after = 0
    while after < head:
        entries = await admin.log_json(session_id, after, min(EXPORT_BATCH, head - after))
        if not entries:
            raise RuntimeError(f"the log of {session_id} ends at {after}, before its head {head}")
        for version, line in entries:
            yield line + b"\n"
            after = version


def parse_export(lines: Iterable[bytes]) -> list[tuple[str, list[Event]]]:
    """Every session in an export file, validated: versions 1..n, the header's count, a log the fold accepts."""
    sessions: list[tuple[ExportHeader, list[Event]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = _any.decode(line)
            if isinstance(raw, dict) and raw.get("format") == FORMAT:
                header = _header.decode(line)
                if parse_uuid(header.session_id) != header.session_id:
                    raise ValueError(f"session_id {header.session_id!r} is not a lowercase UUID")
                sessions.append((header, []))
                continue
            if not sessions:
                raise ValueError("an event before any header line")
            header = sessions[-1][0]
            if header.schema != SCHEMA_VERSION and isinstance(raw, dict) and isinstance(raw.get("data"), dict):
                raw["data"] = upcast(str(raw.get("type")), header.schema, raw["data"])
                line = _encode(raw)
            sessions[-1][1].append(_event.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError) as e:
            raise InvalidImport(f"line {number}: {e}") from e
    out = []
    for header, events in sessions:
        if not events:
            raise InvalidImport(f"session {header.session_id}: no events (a log starts with SessionCreated)")
        if len(events) != header.events:
            raise InvalidImport(
                f"session {header.session_id}: the header counts {header.events} events, the file has {len(events)}"
            )
        try:
            if fold(SessionState(id=header.session_id), events).session is None:  # a fork's lone SessionForked
                raise ValueError("the log creates no session (a fork's holds its inherited events)")
            for event in events:  # what the read models could not store (integers past 64 bits) is refused here
                _msgpack(event.data)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidImport(f"session {header.session_id}: {e}") from e
        out.append((header.session_id, events))
    if not out:
        raise InvalidImport("no session in the input")
    return out


async def import_sessions(
    service: SessionService, admin: LogAdmin, tenant: str, lines: Iterable[bytes]
) -> list[tuple[str, int]]:
    """Append each parsed session as the tenant's; refuses (writing nothing) if any of the ids exists anywhere."""
    sessions = parse_export(lines)
    for sid, _ in sessions:
        if (await admin.head(sid))[1] is not None:
            raise SessionExists(f"session {sid} already exists in this deployment; nothing was imported")
    done: list[tuple[str, int]] = []
    for sid, events in sessions:
        outcome = await service.log.append(tenant, sid, 0, events)
        if not isinstance(outcome, Appended):
            raise SessionExists(
                f"session {sid} already exists in this deployment; {len(done)} sessions were imported before it"
            )
        done.append((sid, outcome.version))
    return done


async def purge(
    service: SessionService,
    admin: LogAdmin,
    tenant: str,
    session_id: str,
    expected_version: int | None = None,
    end_chats: Callable[[SessionState], Awaitable[None]] | None = None,
    idempotency: Idempotency | None = None,
) -> datetime:
    """Delete the session if it is live, then erase it, leaving a `SessionPurged` tombstone in the audit stream.

    `end_chats` runs between the two with the state before the delete: it tells whoever waits on the session's
    chats that they ended, while their streams still exist. Answers when the session was deleted.

    `idempotency` goes with the delete (a key used for another request is refused before anything changes; a
    retry after a crash between the delete and the erase finishes the erase); the erase takes it away with the
    session's other records, so a retry of a finished purge finds nothing (404)."""
    before = await service.log.load(tenant, session_id)
    if before is None:
        raise NotFound(f"session {session_id} not found")
    if idempotency is not None and not before.exists:
        await service.replayed(tenant, session_id, idempotency, _Done)  # IdempotencyKeyReused for another request
    await _no_readers(admin, session_id)
    if before.exists:  # refused while forks read it, and no fork is made after it: a 409 changes nothing
        command = DeleteSession(expected_version=expected_version, purge=True)
        for _ in range(8):
            try:
                await service.execute(tenant, session_id, command, lambda s, e: _Done(), idempotency, _Done)
                break
            except PurgeConflict:
                await _no_readers(admin, session_id)  # a fork made since the check above; else it is gone: again
        else:
            raise Contention(f"session {session_id} kept changing while being purged; retry")
    elif expected_version is not None and expected_version != before.version:
        raise VersionConflict(f"the session is at version {before.version}, not {expected_version}")
    if end_chats is not None:
        await end_chats(before)
    for _ in range(8):
        state = await service.log.load(tenant, session_id)
        if state is None:
            raise NotFound(f"session {session_id} not found")
        last = (await service.log.read(session_id, state.version - 1, 1))[0]
        deleted_at = last.occurred_at if isinstance(last, SessionDeleted) else datetime.now(UTC)
        assert state.session is not None
        tombstone = SessionPurged(
            id=uuid7(),
            occurred_at=datetime.now(UTC),
            data=SessionPurgedData(session_id=session_id, user_id=state.session.user_id, event_count=state.version),
        )
        try:
            parent = state.forked_from.session_id if state.forked_from is not None else None
            if not await admin.purge(tenant, session_id, state.version, tombstone, parent):
                raise NotFound(f"session {session_id} not found")
        except PurgeConflict:
            await _no_readers(admin, session_id)  # a fork made since the check above
            continue
        service.forget(tenant, session_id)
        return deleted_at
    raise Contention(f"session {session_id} kept changing while being purged; retry")


async def _no_readers(admin: LogAdmin, session_id: str) -> None:
    if forks := await admin.readers(session_id):
        raise HasForks(
            f"session {session_id} has {len(forks)} forks that read its history (copy-on-write): purge them first",
            {"forks": forks},
        )


async def sessions_of_user(service: SessionService, admin: LogAdmin, tenant: str, user_id: str) -> list[str]:
    """The tenant's sessions (deleted ones too) whose `user_id` is this user."""
    out = []
    for sid in await admin.session_ids(tenant):
        state = await service.log.load(tenant, sid)
        if state is not None and state.session is not None and state.session.user_id == user_id:
            out.append(sid)
    return out


class History:
    """The history use cases over one deployment's log: export, import, purge (one session or a user's), the audit
    stream of purges. (Rebuilding the read models is `shared.app.rebuild`.)"""

    def __init__(self, service: SessionService, admin: LogAdmin, jobs: ChatJobs) -> None:
        self.service = service
        self.admin = admin
        self.jobs = jobs

    async def end_chats(self, before: SessionState) -> None:
        """Whoever waits on a deleted session's chats learns they ended (`before`: its state before the delete)."""
        for chat in before.active_chats:
            await self.jobs.emit(before.id, chat.job_id, "error", SESSION_DELETED)

    async def head(self, session_id: str) -> tuple[int, str | None]:
        """(the session's last version, its tenant); (0, None) for no such session."""
        head, tenant, _ = await self.admin.head(session_id)
        return head, tenant

    def export(self, session_id: str) -> AsyncIterator[bytes]:
        return export_lines(self.admin, session_id)

    async def import_(self, tenant: str, lines: Iterable[bytes]) -> list[tuple[str, int]]:
        return await import_sessions(self.service, self.admin, tenant, lines)

    async def purge(
        self,
        tenant: str,
        session_id: str,
        expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> datetime:
        return await purge(self.service, self.admin, tenant, session_id, expected_version, self.end_chats, idempotency)

    async def purge_all(
        self, tenant: str, session_ids: Iterable[str], purged: Callable[[str], None] = lambda sid: None
    ) -> list[str]:
        """Purge each session (`purged` told of each); one its forks read waits for them, in passes until a pass
        purges nothing. Answers those left: forks outside `session_ids` read them (nothing of them changed)."""
        left = list(session_ids)
        while left:
            waiting = []
            for sid in left:
                try:
                    await self.purge(tenant, sid)
                except HasForks:
                    waiting.append(sid)
                    continue
                purged(sid)
            if len(waiting) == len(left):
                return waiting
            left = waiting
        return []

    async def sessions_of_user(self, tenant: str, user_id: str) -> list[str]:
        return await sessions_of_user(self.service, self.admin, tenant, user_id)

    async def audit(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        """The tenant's `SessionPurged` tombstones after the cursor `after`, oldest first, and the next cursor."""
        if after == "":  # not "from the start": that is no `after` at all (as on /audit/webhooks)
            raise Invalid("after is not a cursor this endpoint gave out", {"query": "after"})
        try:
            return await self.admin.audit(tenant, after, limit)
        except (ValueError, UnicodeDecodeError) as e:
            raise Invalid("after is not a cursor this endpoint gave out", {"query": "after"}) from e

    async def rewrite_persistence(self) -> list[str]:
        """Ask the store to rewrite its persistence files, so purged data leaves the disk too."""
        return await self.admin.rewrite_persistence()
