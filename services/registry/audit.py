"""An admin API request's audit record, committed in the same transaction as the command
the request runs, where it can be.

The API's gate (``gate.py``) appends an ``AdminActionPerformed`` for every mutating
request before its answer goes out. Appended after the route's own command, that is a
second commit the caller waits for. So the gate opens an :class:`AuditSlot` for the
request; a route whose outcome one command decides says what it answers when that
command succeeds (:func:`answers`), and the command (``_execute(..., audited=True)``)
appends the record in its own transaction and marks the slot. The gate then records only
an answer whose status differs from the one committed (the command failed, or something
after it did): every mutating request still has a record of its real answer, durable
before the answer goes out.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class AuditSlot:
    """Who made the request and what it was (the audit trail's path); ``answers``: the
    status the route gives when its command succeeds; ``committed``: the status of the
    record already committed with that command."""

    name: str
    role: str
    method: str
    path: str
    answers: int | None = None
    committed: int | None = None


_current: ContextVar[AuditSlot | None] = ContextVar("streamboot_audit_slot", default=None)


def opened(slot: AuditSlot) -> object:
    """Make ``slot`` the current request's; returns what :func:`closed` takes."""
    return _current.set(slot)


def closed(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def answers(status: int) -> None:
    """The route answers ``status`` when its command succeeds: the command may carry the
    request's audit record (no-op outside an audited request: NATS, tests)."""
    slot = _current.get()
    if slot is not None:
        slot.answers = status


def to_commit() -> AuditSlot | None:
    """The current request's slot, if a command may still commit its record."""
    slot = _current.get()
    if slot is None or slot.answers is None or slot.committed is not None:
        return None
    return slot
