"""Retention: which policy holds a session, and when it expires. Pure: the sweeper (`shared.app.retention`) and the
reads that show `expires_at` ask the same questions of the same data."""

from __future__ import annotations

from datetime import datetime, timedelta

from msgspec import structs

from shared.domain.state import SessionState
from shared.domain.wire import Retention, Session, TenantLimits

__all__ = ["MIN_IDLE", "expires_at", "in_use", "keep", "policy", "shown_from", "with_expiry"]

MIN_IDLE = timedelta(days=1)
"""No policy lets a session go sooner after its last change: the sweeper looks no closer to now than this."""


def policy(session: Session, tenant: TenantLimits) -> Retention | None:
    """The session's own retention, else its tenant's (None: kept for ever)."""
    if session.retention is not None:
        return session.retention
    if tenant.retention_idle_days > 0 or tenant.retention_keep_messages > 0:
        return Retention(
            idle_days=tenant.retention_idle_days or None,
            action=tenant.retention_action,
            keep_messages=tenant.retention_keep_messages or None,
        )
    return None


def expires_at(session: Session, tenant: TenantLimits) -> datetime | None:
    held = policy(session, tenant)
    if held is None or held.idle_days is None:
        return None
    return session.updated_at + timedelta(days=held.idle_days)


def in_use(state: SessionState) -> bool:
    """A chat of the session is queued (a delayed one too) or running, or one of its schedules is live: past its
    `expires_at` it is not removed while so (its next change moves `expires_at` on)."""
    return bool(state.active_chats) or any(not s.spec.paused for s in state.schedules)


def keep(session: Session, tenant: TenantLimits) -> int | None:
    """How many of the newest messages the session's message list shows (None: all). The Redis read script
    (`read_messages.lua`) and the read-model trim (`trim.lua`) answer the same from the session's JSON."""
    held = policy(session, tenant)
    return held.keep_messages if held is not None else None


def shown_from(shown: int, keep_messages: int | None) -> int:
    """How many of a list's `shown` messages (oldest first) a `keep_messages` retention hides."""
    return max(0, shown - keep_messages) if keep_messages is not None else 0


def with_expiry(session: Session, tenant: TenantLimits) -> Session:
    """The session as a read shows it: with `expires_at` (it depends on the tenant's policy, which the projected
    view cannot know, so reads add it)."""
    return structs.replace(session, expires_at=expires_at(session, tenant))
