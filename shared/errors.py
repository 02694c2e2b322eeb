"""The base of errors an operator acts on: each carries a ``kind`` (invalid, not_found,
conflict, refused, ...) from which REST status codes, NATS error replies and CLI exit codes
derive. The registry's domain errors and the CLI's client errors are both kinds of it, so
the CLI reports either without knowing where it came from."""

from __future__ import annotations


class OperatorError(Exception):
    kind: str = "error"
