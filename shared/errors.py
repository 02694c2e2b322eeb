"""The base of errors an operator acts on: each carries a ``kind`` (invalid, not_found,
conflict, refused, ...) from which REST status codes, NATS error replies and CLI exit codes
derive. The registry's domain errors and the CLI's client errors are both kinds of it, so
the CLI reports either without knowing where it came from.

:class:`DomainError` is the registry's refusal, named in words an operator can act on; it
lives here because the vdisk store (``shared/vdisk_store.py``), run by the registry and by
the importing CLI, raises it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shared.events import Event


class OperatorError(Exception):
    kind: str = "error"


def reason(exc: BaseException) -> str:
    """What a log line says went wrong: the message, or the exception's type when it has
    none (a timeout's message is empty, and "failed ()" tells the operator nothing)."""
    return str(exc) or type(exc).__name__


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
