"""A copy-on-write fork's inherited history, filled in from its parent's log as it is read.

A fork's log stores its `SessionForked` at version 1 and its own events after the inherited range; versions
2..`last` (its parent's 1..`last - 1`) are not stored (`shared.domain.fork`). Both log adapters read a range of a
session's log as it is stored and complete it here: a range holding fewer entries than versions is a fork's, and
the versions it lacks are read from the parent (completed the same way, so a fork of a fork works) and made the
fork's own. The parent's history up to the fork's version never changes, and a purge of the parent is refused
while a fork reads it, so completing a read after it is as consistent as the read itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from shared.adapters.codec import decode_event, log_fields
from shared.domain.events import SCHEMA_VERSION, Event, SessionForked
from shared.domain.fork import inherited
from shared.domain.ids import derived_id

__all__ = ["Entry", "checked", "complete", "made_own"]

Entry = tuple[int, dict[bytes, bytes]]
"""(version, the log's fields of the event at that version)."""


async def complete(
    session_id: str,
    entries: Sequence[Entry],
    after: int,
    upto: int,
    origin: Callable[[], Awaitable[tuple[str, int] | None]],
    read_parent: Callable[[str, int, int], Awaitable[list[Entry]]],
) -> list[Entry]:
    """The session's entries `after + 1..upto`: `entries` as stored (in order; may run past `upto`) with the
    inherited ones filled in, always a run of consecutive versions from `after + 1`. `origin()`: (parent, last
    inherited version), None if the session is no fork; `read_parent(parent, after, count)`: the parent's
    entries, completed."""
    own = [e for e in entries if e[0] <= upto]
    if len(own) >= upto - after:
        return own
    made: list[Entry] = []
    if (fork := await origin()) is not None:
        parent, last = fork
        lo, hi = max(after + 1, 2), min(upto, last)
        lent = await read_parent(parent, lo - 2, hi - lo + 1) if hi >= lo else []
        made = [(version + 1, made_own(parent, session_id, version, fields)) for version, fields in lent]
    out: list[Entry] = []
    for entry in sorted([*own, *made], key=lambda e: e[0]):
        if entry[0] != after + len(out) + 1:
            break  # purged while it was read (the fork, then its parent): what was read up to there
        out.append(entry)
    return out


def checked(
    events: Sequence[Event], inherits: tuple[str, int] | None, partition: int, partition_of: Callable[[str], int]
) -> tuple[str, int] | None:
    """`inherits`, once sure the append (in `partition`) is a fork's first, in its parent's partition
    (`EventLog.append`): the fork reads its parent's log in its slot."""
    if inherits is None:
        return None
    first = events[0]
    if not (isinstance(first, SessionForked) and first.data.parent_id == inherits[0]):
        raise ValueError("a copy-on-write fork's first append starts with its SessionForked")
    if partition_of(inherits[0]) != partition:
        raise ValueError("a copy-on-write fork reads its parent's log in its slot: its id is in its partition")
    return inherits


def made_own(parent_id: str, child_id: str, version: int, fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The fields of the parent's event at `version` as the fork shows it, at `version + 1` (`inherited`). A
    message of today's schema, most of any log, is made the fork's without decoding it: its `session_id` is the one
    id it names, as APPLY and READ_MESSAGES make it in Lua."""
    if fields[b"t"] in _MESSAGES and fields.get(b"s") == _SCHEMA:
        named = b'"session_id":"%s"' % parent_id.encode()
        if named in fields[b"d"]:
            event_id = derived_id(child_id, f"event/{fields[b'i'].decode()}").encode()
            data = fields[b"d"].replace(named, b'"session_id":"%s"' % child_id.encode(), 1)
            return {**fields, b"i": event_id, b"d": data}
    [event] = inherited(parent_id, child_id, [decode_event(version, fields)])
    return log_fields(event)


_MESSAGES = (b"MessageAdded", b"MessageEdited")
_SCHEMA = str(SCHEMA_VERSION).encode()
