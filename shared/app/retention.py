"""The retention sweeper: deletes (or purges) the sessions whose retention says they have been idle long enough.

A session's retention is its own (`Session.retention`) or its tenant's (`TenantLimits.retention_*`); it expires
`idle_days` after its last change (`shared.domain.retention`). The read models keep an index of live sessions by
last change per partition (`ReadModels.idle`); a pass walks it oldest first, from where the previous pass stopped,
at most `batch` sessions per partition, so a pass is bounded whatever the deployment holds, and every session is
looked at again once the walk wraps around. Each expired session is deleted or purged through the same use case
as `DELETE /sessions/{id}` (an event in its log, or a tombstone in the audit stream), on the version it was read
at: one that changed meanwhile is left for a later pass.

A `keep_messages` retention hides a session's older messages from its list at once (the read does it); the sweeper
then frees the read model's copies of them (`ReadModels.trim`), walking the same index in the same bounded way up
to `TRIM_SETTLE_S` ago (a tenant's policy may change, or an import land, anywhere in it). A session freed before
costs one short script call a pass. The log keeps every message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec

from shared.app.ports import IdleCursor, ReadModels
from shared.app.sessions import Sessions
from shared.domain.errors import Contention, HasForks, NotFound, ProjectionLagging, VersionConflict
from shared.domain.retention import MIN_IDLE, in_use
from shared.domain.wire import RetentionAction, Session

__all__ = ["TRIM_SETTLE_S", "Expired", "RetentionSweeper", "Sweep", "Trimmed"]

_session = msgspec.json.Decoder(Session)
TRIM_SETTLE_S = 60
"""The trim walk stops this far before now, so that a change the projector indexes late is still ahead of it."""
TRIM_BUDGET = 1_000
"""Message copies one trim call frees at most (one short script); a session with more takes several."""


class Expired(msgspec.Struct, kw_only=True):
    tenant: str
    session_id: str
    action: RetentionAction
    expires_at: datetime
    done: bool
    """False in a dry run, or when the session changed (or went) before the sweeper got to it."""


class Trimmed(msgspec.Struct, kw_only=True):
    tenant: str
    session_id: str
    messages: int
    """Message copies freed from its read model (in a dry run: that would be)."""
    done: bool


class Sweep(msgspec.Struct, kw_only=True):
    scanned: int = 0
    """Idle sessions looked at."""
    expired: list[Expired] = msgspec.field(default_factory=list)
    trimmed: list[Trimmed] = msgspec.field(default_factory=list)
    wrapped: bool = True
    """Every partition's walks have reached their end since the round began (the next pass starts a new round)."""


class RetentionSweeper:
    def __init__(
        self,
        sessions: Sessions,
        views: ReadModels,
        partitions: int,
        batch: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.views = views
        self.partitions = partitions
        self.batch = batch
        self.clock = clock
        self._cursors: dict[int, IdleCursor] = {}
        self._trim_cursors: dict[int, IdleCursor] = {}
        """Where each partition's trim walk goes on from."""
        self._ended: set[tuple[str, int]] = set()
        """The walks ("expiry", "trim") of partitions that reached their end in this round: they wait for the others
        (a walk started over meanwhile would name its sessions again in the same round, a dry run's list too)."""

    async def sweep(self, dry_run: bool = False, tenant: str | None = None) -> Sweep:
        """One bounded pass over every partition. `dry_run`: say what would go, change nothing. `tenant`: only
        that tenant's sessions."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        until_ms = int((now - MIN_IDLE).timestamp() * 1000)
        out = Sweep()
        for p in range(self.partitions):
            if ("expiry", p) in self._ended:
                continue
            page = await self.views.idle(p, until_ms, self._cursors.get(p), self.batch)
            if len(page) == self.batch:
                self._cursors[p] = page[-1]
                out.wrapped = False
            else:
                self._cursors.pop(p, None)
                self._ended.add(("expiry", p))
            for entry in page:
                if tenant is not None and entry.tenant != tenant:
                    continue
                out.scanned += 1
                try:
                    raw, version = await self.sessions.get(entry.tenant, entry.session_id)
                except NotFound:  # purged: the index outlived it
                    await self.views.forget_idle(p, entry.tenant, entry.session_id)
                    continue
                except ProjectionLagging:  # its read model is behind: the next pass looks again
                    continue
                session = _session.decode(raw)
                if session.expires_at is None or session.expires_at > now:
                    continue
                try:  # its state, not its read model: a chat asked for a moment ago counts
                    if in_use(await self.sessions.service.current(entry.tenant, entry.session_id)):
                        continue
                except NotFound:  # purged since it was read
                    continue
                own = session.retention
                action = (
                    own.action
                    if own is not None
                    else (await self.sessions.limits.limits(entry.tenant)).retention_action
                )
                done = not dry_run and await self._remove(entry.tenant, entry.session_id, version, action)
                out.expired.append(
                    Expired(
                        tenant=entry.tenant,
                        session_id=entry.session_id,
                        action=action,
                        expires_at=session.expires_at,
                        done=done,
                    )
                )
        await self._trim(out, dry_run, tenant)
        if out.wrapped:  # the round is over: the next pass starts every walk over
            self._ended.clear()
        return out

    async def _trim(self, out: Sweep, dry_run: bool, tenant: str | None) -> None:
        until_ms = int((self.clock() - TRIM_SETTLE_S) * 1000)
        for p in range(self.partitions):
            if ("trim", p) in self._ended:
                continue
            page = await self.views.idle(p, until_ms, self._trim_cursors.get(p), self.batch)
            if len(page) == self.batch:
                self._trim_cursors[p] = page[-1]
                out.wrapped = False
            else:
                self._trim_cursors.pop(p, None)
                self._ended.add(("trim", p))
            for entry in page:
                if tenant is not None and entry.tenant != tenant:
                    continue
                keep = (await self.sessions.limits.limits(entry.tenant)).retention_keep_messages
                budget = 2**31 if dry_run else TRIM_BUDGET  # a dry run counts; only freeing is done in steps
                freed = 0
                while True:
                    n = await self.views.trim(entry.tenant, entry.session_id, keep, budget, dry_run)
                    freed += n
                    if n < budget:
                        break
                if freed:
                    out.trimmed.append(
                        Trimmed(tenant=entry.tenant, session_id=entry.session_id, messages=freed, done=not dry_run)
                    )

    async def _remove(self, tenant: str, session_id: str, version: int, action: RetentionAction) -> bool:
        try:
            await self.sessions.delete(tenant, session_id, version, purge=action == "purge")
        except (VersionConflict, NotFound, Contention):  # it changed, went, or is busy: a later pass decides
            return False
        except HasForks:  # its forks read its history: it is not erased before they are
            return False
        return True
