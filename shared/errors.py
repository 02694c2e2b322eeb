"""The base of errors an operator acts on: each carries a ``kind`` (invalid, not_found,
conflict, refused, ...) from which REST status codes, NATS error replies and CLI exit codes
derive. The registry's domain errors and the CLI's client errors are both kinds of it, so
the CLI reports either without knowing where it came from."""

from __future__ import annotations


class OperatorError(Exception):
    kind: str = "error"


def reason(exc: BaseException) -> str:
    """What a log line says went wrong: the message, or the exception's type when it has
    none (a timeout's message is empty, and "failed ()" tells the operator nothing)."""
    return str(exc) or type(exc).__name__
