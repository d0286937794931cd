"""Domain errors: why a command was refused. The API maps each `code` to an HTTP status."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "domain_error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(DomainError):
    code = "not_found"


class Invalid(DomainError):
    """The command is well-formed but breaks a rule of the session (→ 422)."""

    code = "validation_failed"


class VersionConflict(DomainError):
    """The caller's expected version (If-Match) is not the session's version (→ 412)."""

    code = "version_conflict"


class IdempotencyKeyReused(DomainError):
    """The Idempotency-Key was first used with another request (→ 422)."""

    code = "idempotency_key_reused"


class ProjectionLagging(DomainError):
    """The read model did not reach the last acknowledged write in time (→ 503)."""

    code = "projection_lagging"


class Contention(DomainError):
    """Too many concurrent writers on one session; the client should retry (→ 409)."""

    code = "write_contention"


class MessageChanged(Contention):
    """An edit was decided on a message as read at an older version of its session: read it again (the use case
    does; only if it keeps changing does the client see a 409)."""


class ChatInProgress(DomainError):
    """Another chat of the session is queued or running and the policy is `reject` (→ 409)."""

    code = "chat_in_progress"


class DeletedAtVersion(DomainError):
    """The session was deleted at the version asked for (a fork of it): a state the request cannot change (→ 409)."""

    code = "session_deleted"


class HasForks(DomainError):
    """Copy-on-write forks read the session's log, so it cannot be erased before they are (→ 409)."""

    code = "has_forks"


class TickTaken(DomainError):
    """A schedule's tick was taken already (or the schedule was paused or deleted): firing it does nothing."""

    code = "tick_taken"


class ChatNotActive(DomainError):
    """The chat job already ended; it cannot be cancelled (→ 409)."""

    code = "chat_not_active"


class VersionNotFound(NotFound):
    """Time travel to a version the session never had: 0, or past its last event (→ 404)."""

    code = "version_not_found"


class SessionExists(DomainError):
    """An import names a session id this deployment already holds (→ 409); nothing is written."""

    code = "session_exists"


class InvalidImport(DomainError):
    """An export file that is not a whole, valid session log (→ 422); nothing is written."""

    code = "invalid_import"


class ChatUnanswered(DomainError):
    """The chat job ended without an answer; `code` is the job's error code (`token_budget_exceeded`, `cancelled`,
    `session_deleted`, `model_…`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ChatTimeout(DomainError):
    """No answer within the wait (`PARLEY_CHAT_WAIT_S`); the job goes on."""

    code = "chat_timeout"


class RateLimited(DomainError):
    """The tenant is at one of its limits (rate, concurrent chats, open streams) (→ 429)."""

    code = "rate_limited"
    retry_after = 1


class QuotaExceeded(DomainError):
    """The tenant used its chat tokens of the day (→ 429 until midnight UTC)."""

    code = "quota_exceeded"

    def __init__(self, message: str, details: object, retry_after: int) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after


class WebhookUrlRefused(Invalid):
    """A webhook URL that does not resolve, or resolves to a loopback or private address the deployment does not
    allow (→ 422); nothing is written."""

    code = "webhook_url_refused"
