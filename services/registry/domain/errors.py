"""Domain errors: each names the problem in words an operator can act on.

``kind`` maps to transports: REST status codes, NATS error replies (``{"error", "kind"}``)
and CLI exit codes all derive from it, in one place each.
"""

from __future__ import annotations

from typing import Literal

from shared.errors import OperatorError
from shared.events import Event

ErrorKind = Literal["invalid", "not_found", "conflict", "refused", "busy"]


class DomainError(OperatorError):
    def __init__(
        self, message: str, kind: ErrorKind = "invalid", events: list[Event] | None = None
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        # Events to append even though the command failed (SessionConflictRejected: the
        # refusal itself is part of the audit trail).
        self.events: list[Event] = events or []
        # For ``busy``: when to ask again (REST ``Retry-After``, NATS ``retry_after_s``).
        self.retry_after_s: int | None = None


def invalid(message: str) -> DomainError:
    return DomainError(message, "invalid")


def not_found(message: str) -> DomainError:
    return DomainError(message, "not_found")


def conflict(message: str, events: list[Event] | None = None) -> DomainError:
    return DomainError(message, "conflict", events)


def refused(message: str) -> DomainError:
    return DomainError(message, "refused")


def busy(message: str, retry_after_s: int) -> DomainError:
    """Not a decision: the server takes no more of these now; nothing was done, ask again."""
    exc = DomainError(message, "busy")
    exc.retry_after_s = retry_after_s
    return exc
