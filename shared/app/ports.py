"""The I/O contracts the services depend on. Adapters implement them; one contract
test suite (tests/integration/test_store_contract.py) runs against every adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from msgspec import Struct

from shared.domain.events import Event
from shared.domain.projection import ReadModelUpdate
from shared.domain.state import SessionState


class IdempotencyClaim(Struct, kw_only=True, frozen=True):
    """Stored with an append, atomically: a retry with the same key gets `response` back."""

    key: str
    request_hash: str
    response: bytes


class Appended(Struct, frozen=True):
    version: int


class Replayed(Struct, frozen=True):
    response: bytes


class Conflict(Struct, frozen=True):
    version: int


class IdempotencyMismatch(Struct, frozen=True):
    pass


class Missing(Struct, frozen=True):
    """No such session for this tenant (unknown, or another tenant's)."""


AppendOutcome = Appended | Replayed | Conflict | IdempotencyMismatch | Missing


class EventLog(Protocol):
    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_version: int,
        events: Sequence[Event],
        claim: IdempotencyClaim | None = None,
    ) -> AppendOutcome:
        """Append iff the session's version is `expected_version` (0: the session must not exist)."""
        ...

    async def load(self, tenant: str, session_id: str, known: SessionState | None = None) -> SessionState | None:
        """The session's state at its last event, or None if this tenant has no such session."""
        ...

    async def recall(self, tenant: str, session_id: str, key: str, request_hash: str) -> bytes | None:
        """The stored response of an idempotent write: None if the key is unused, b"" if it was used
        with another request. `session_id` names the partition the record lives in."""
        ...

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[Event]: ...

    async def events(self, tenant: str, session_id: str, after: int, limit: int) -> View:
        """Up to `limit` events after version `after`, as wire JSON in `items`; `head` 0: no such session."""
        ...

    async def at_version(self, tenant: str, session_id: str, version: int) -> tuple[int, SessionState | None]:
        """(head, the state right after event `version`, or None past the head); head 0: no such session."""
        ...


class View(Struct, frozen=True):
    """A read-model answer plus what it takes to judge its freshness.

    `head` is the session's last appended version (0: no such session for this
    tenant), `version` the version the read model has reached. The service layer
    waits while `version < head`, which is how a client reads its own writes.
    """

    head: int
    version: int
    body: bytes | None
    items: list[bytes] | None = None


class Pending(Struct, frozen=True):
    """A session's events the read models have not folded in yet, and the state to fold them onto."""

    tenant: str
    state: SessionState
    events: list[Event]
    head: int


class ReadModels(Protocol):
    async def session(self, tenant: str, session_id: str) -> View: ...

    async def tools(self, tenant: str, session_id: str) -> View: ...

    async def messages(self, tenant: str, session_id: str, limit: int, offset: int) -> View:
        """`items` holds the page's message JSON, oldest first; `body` is None once the session is gone."""
        ...

    async def sessions(self, tenant: str, limit: int, offset: int) -> tuple[list[int], list[bytes]]:
        """(lagging partitions, session JSON newest first). A lagging partition holds an acknowledged write of the
        tenant's that is not projected yet."""
        ...

    async def pending(self, session_ids: Sequence[str]) -> list[Pending | None]:
        """For each session, what the projector still has to apply (None: unknown session)."""
        ...

    async def apply(self, updates: Sequence[tuple[str, ReadModelUpdate]]) -> list[bool]:
        """Apply each (tenant, update) iff its read model is at `update.from_version`; False: someone else did."""
        ...
