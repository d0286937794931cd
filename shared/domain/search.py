"""Finding sessions: the search index's entries, a query's plan, and the cursor, decided purely.

A tenant's sessions are indexed per partition in one lexicographic sorted set (all scores 0). Each live session
has, for each sort order (`c` created_at, `u` updated_at) and each *term* it matches (`*` every session,
`a` agent_id, `u` user_id, `m` a scalar metadata key=value, `s` status), one member

    <term> \\0 <order> \\0 <ms, 15 digits> \\0 <session id>

so the sessions matching one term, in either order and within a time range, are one contiguous range
(ZRANGEBYLEX … LIMIT: O(log N + page)), and whether a session matches another term is one exact ZSCORE. One more
member per session, `# \\0 <id> \\0 <created ms> \\0 <updated ms>`, gives its times for a range on the other order.

The projector computes a session's entries here (`entries`) and the store replaces the old ones by them in the
same atomic step as the view, so the index is a projection like any other (rebuilt with the views).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.domain.errors import Invalid
from shared.domain.state import SessionState
from shared.domain.wire import Session

__all__ = [
    "COUNT_BUDGET",
    "FIELDS",
    "MAX_FILTERS",
    "MAX_INDEXED_METADATA",
    "MAX_INDEXED_VALUE",
    "SCAN_BUDGET",
    "SORTS",
    "STATUSES",
    "Page",
    "PartitionPage",
    "Position",
    "Query",
    "decode_cursor",
    "encode_cursor",
    "entries",
    "matches",
    "merge",
    "metadata_text",
    "parse_fields",
    "query_of",
    "search_times",
    "term",
]

SEP = "\x00"
MAX_INDEXED_METADATA = 16
"""Metadata keys indexed per session (the first ones in key order); a filter on another key finds nothing there."""
MAX_INDEXED_VALUE = 256
"""Longer metadata values (as text) are not indexed."""
SCAN_BUDGET = 2_000
"""Index entries one partition walks per list request at most: an unselective filter combination answers a short
page with `next` rather than walking the whole index."""
COUNT_BUDGET = 10_000
"""Index entries one partition walks per count at most; beyond it the count is a lower bound (`exact: false`)."""
SORTS = ("created_at", "-created_at", "updated_at", "-updated_at")
STATUSES = ("idle", "busy")
FIELDS: tuple[str, ...] = Session.__struct_fields__
"""What `fields=` may name: the session resource's top-level fields."""
MAX_FILTERS = 8
"""`metadata.<key>` filters per request at most."""
_MS_DIGITS = 15


class Query(Struct, kw_only=True, frozen=True):
    """What a list or count asks for; time bounds in ms since the epoch, inclusive."""

    agent_id: str | None = None
    user_id: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    status: Literal["idle", "busy"] | None = None
    created_after: int | None = None
    created_before: int | None = None
    updated_after: int | None = None
    updated_before: int | None = None
    sort: str = "-created_at"

    @property
    def order(self) -> str:
        """`c` or `u`: which time the walk follows."""
        return "u" if self.sort.lstrip("-") == "updated_at" else "c"

    @property
    def descending(self) -> bool:
        return self.sort.startswith("-")

    def terms(self) -> list[str]:
        """The equality terms every match has (none: `*`, every session)."""
        out = []
        if self.agent_id is not None:
            out.append(term("a", self.agent_id))
        if self.user_id is not None:
            out.append(term("u", self.user_id))
        out += [term("m", k, v) for k, v in self.metadata]
        if self.status is not None:
            out.append(term("s", self.status))
        return out or ["*"]

    def bounds(self, order: str) -> tuple[int | None, int | None]:
        return (self.created_after, self.created_before) if order == "c" else (self.updated_after, self.updated_before)

    def fingerprint(self) -> str:
        """What a cursor is bound to: the same filters and sort."""
        return hashlib.sha256(msgspec.msgpack.encode(self)).hexdigest()[:12]


class Position(Struct, frozen=True, array_like=True, order=True):
    """A place in a walk: the session's time in the walk's order (ms) and its id."""

    ms: int
    session_id: str


class PartitionPage(Struct, frozen=True):
    """One partition's answer: matches in walk order; `scanned`: the last entry walked when the walk stopped
    early (budget or page full), None when it reached the end of the range."""

    matches: list[Position]
    scanned: Position | None


class Page(Struct, frozen=True):
    positions: list[Position]
    next: Position | None


def query_of(
    *,
    agent_id: str | None = None,
    user_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    status: Literal["idle", "busy"] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    updated_after: datetime | None = None,
    updated_before: datetime | None = None,
    sort: str = "-created_at",
) -> Query:
    """A query from request values (times without a zone are UTC); Invalid names the parameter at fault."""
    if sort not in SORTS:
        raise Invalid(f"sort must be one of {', '.join(SORTS)}", {"query": "sort"})
    pairs = sorted((metadata or {}).items())
    if len(pairs) > MAX_FILTERS:
        raise Invalid(f"at most {MAX_FILTERS} metadata filters", {"query": "metadata"})
    for key, value in pairs:
        if not key or len(key) > MAX_INDEXED_VALUE:
            raise Invalid("a metadata filter names a key of 1 to 256 characters", {"query": f"metadata.{key}"})
        if len(value) > MAX_INDEXED_VALUE:
            raise Invalid(
                f"metadata values longer than {MAX_INDEXED_VALUE} characters are not indexed",
                {"query": f"metadata.{key}"},
            )
    return Query(
        agent_id=agent_id,
        user_id=user_id,
        metadata=tuple(pairs),
        status=status,
        created_after=_ms_or_none(created_after),
        created_before=_ms_or_none(created_before),
        updated_after=_ms_or_none(updated_after),
        updated_before=_ms_or_none(updated_before),
        sort=sort,
    )


def _ms_or_none(at: datetime | None) -> int | None:
    if at is None:
        return None
    return ms(at if at.tzinfo is not None else at.replace(tzinfo=UTC))


def parse_fields(text: str | None) -> tuple[str, ...] | None:
    """`fields=` as the fields to answer (`id` always among them); None: all. Invalid on an unknown one."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r}; fields are {', '.join(FIELDS)}", {"query": "fields"})
    return tuple(dict.fromkeys(["id", *names]))


def _escape(text: str) -> str:
    """No raw separator inside a component: \\1 → \\1\\2, \\0 → \\1\\1 (bijective)."""
    return text.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def term(kind: str, *parts: str) -> str:
    return SEP.join([kind, *(_escape(p) for p in parts)])


def ms(at: datetime) -> int:
    return max(0, int(at.timestamp() * 1000))


def stamp(value: int) -> str:
    return f"{value:0{_MS_DIGITS}d}"


def metadata_text(value: Any) -> str | None:
    """A scalar metadata value as the text a filter compares with (None: not indexed). JSON text for numbers,
    booleans and null, so `metadata.tier=3` finds 3 and "3"."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = msgspec.json.encode(value).decode()
    else:
        return None
    return text if len(text) <= MAX_INDEXED_VALUE else None


def _terms_of(state: SessionState) -> list[str]:
    s = state.session
    assert s is not None
    out = ["*"]
    if s.agent_id is not None:
        out.append(term("a", s.agent_id))
    if s.user_id is not None:
        out.append(term("u", s.user_id))
    indexed = 0
    for key in sorted(s.metadata):
        if indexed == MAX_INDEXED_METADATA:
            break
        text = metadata_text(s.metadata[key])
        if text is not None:
            out.append(term("m", key, text))
            indexed += 1
    out.append(term("s", "busy" if state.active_chats else "idle"))
    return out


def entries(state: SessionState) -> list[str]:
    """The search index members of a session (none once deleted): what APPLY puts in place of the old ones."""
    if not state.exists:
        return []
    s = state.session
    assert s is not None
    created, updated = stamp(ms(s.created_at)), stamp(ms(s.updated_at))
    out = [SEP.join(["#", s.id, created, updated])]
    for t in _terms_of(state):
        out.append(SEP.join([t, "c", created, s.id]))
        out.append(SEP.join([t, "u", updated, s.id]))
    return out


def search_times(members: Iterable[str], session_id: str) -> dict[str, int]:
    """{"c": created ms, "u": updated ms} from a session's members ({} without its record)."""
    record = next((m for m in members if m.startswith("#" + SEP + session_id + SEP)), None)
    if record is None:
        return {}
    _, _, created, updated = record.split(SEP)
    return {"c": int(created), "u": int(updated)}


def matches(members: Iterable[str], session_id: str, query: Query) -> bool:
    """Whether the session with these index members matches the query (what the FIND script checks)."""
    have = set(members)
    times = search_times(have, session_id)
    if not times:
        return False
    created = stamp(times["c"])
    for order in ("c", "u"):
        lo, hi = query.bounds(order)
        if (lo is not None and times[order] < lo) or (hi is not None and times[order] > hi):
            return False
    return all(SEP.join([t, "c", created, session_id]) in have for t in query.terms())


def merge(pages: Sequence[PartitionPage], limit: int, descending: bool) -> Page:
    """The first `limit` matches over all partitions in walk order, and where the next page starts.

    A partition that stopped early may hold matches beyond what it walked, so only matches up to the least
    advanced stopping point are certain; the page ends there (it may be short, even empty, with `next` set)."""
    stops = [p.scanned for p in pages if p.scanned is not None]
    frontier = (max(stops) if descending else min(stops)) if stops else None
    found = sorted((m for p in pages for m in p.matches), reverse=descending)
    if frontier is not None:
        found = [m for m in found if (m >= frontier if descending else m <= frontier)]
    page = found[:limit]
    if len(found) > limit or (frontier is not None and len(page) == limit):
        return Page(page, page[-1])
    return Page(page, frontier)


class _Cursor(Struct, array_like=True):
    q: str
    ms: int
    id: str


def encode_cursor(query: Query, at: Position) -> str:
    raw = msgspec.msgpack.encode(_Cursor(query.fingerprint(), at.ms, at.session_id))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(query: Query, text: str) -> Position:
    """ValueError: not a cursor of this query (another filter or sort, or not one we gave out)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        c = msgspec.msgpack.decode(raw, type=_Cursor)
    except (ValueError, msgspec.DecodeError) as e:
        raise ValueError("not a cursor") from e
    if c.q != query.fingerprint() or c.ms < 0:
        raise ValueError("a cursor of another query")
    return Position(c.ms, c.id)
