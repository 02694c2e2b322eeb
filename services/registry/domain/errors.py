"""Domain errors: each names the problem in words an operator can act on.

``kind`` maps to transports: REST status codes, NATS error replies (``{"error", "kind"}``)
and CLI exit codes all derive from it, in one place each. The classes live in
``shared/errors.py`` (the vdisk store, shared with the importing CLI, raises them too).
"""

from __future__ import annotations

from shared.errors import DomainError, ErrorKind, busy, conflict, invalid, not_found, refused

__all__ = ["DomainError", "ErrorKind", "busy", "conflict", "invalid", "not_found", "refused"]
