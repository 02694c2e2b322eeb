"""Admin API token decisions: create and revoke named tokens of a role.

A token's name is what the audit trail (``AdminActionPerformed``) records, so a name is
never reused, even after its token is revoked: one name, one token, for good. The
built-in ``bootstrap-admin`` is the data dir's ``api-token`` (``STREAMBOOT_API_TOKEN``),
not an event: it is replaced there, never created or revoked here.
"""

from __future__ import annotations

from typing import get_args

from services.registry.domain.errors import conflict, invalid, not_found, refused
from services.registry.projection import Projection
from shared.events import AdminActionPerformed, ApiRole, ApiTokenCreated, ApiTokenRevoked, Event
from shared.identity import check_name

ROLES: tuple[str, ...] = get_args(ApiRole)
BOOTSTRAP_ADMIN = "bootstrap-admin"


def create(p: Projection, name: str, role: str, token_hash: str, by: str) -> list[Event]:
    name = check_name(name, "token name")
    if role not in ROLES:
        raise invalid(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if name == BOOTSTRAP_ADMIN:
        raise conflict(f"{BOOTSTRAP_ADMIN} is the built-in admin token (DATA_DIR/api-token)")
    old = p.api_tokens.get(name)
    if old is not None:
        state = "was revoked" if old["revoked_at"] is not None else "exists"
        raise conflict(
            f"a token named {name!r} {state}: names are never reused (the audit trail names "
            "one token each); pick another name"
        )
    if token_hash in p.api_token_by_hash:
        raise conflict("token collision; try again")
    return [ApiTokenCreated(token_name=name, role=role, token_hash=token_hash, created_by=by)]  # type: ignore[arg-type]


def revoke(p: Projection, name: str, by: str) -> list[Event]:
    if name == BOOTSTRAP_ADMIN:
        raise refused(
            f"{BOOTSTRAP_ADMIN} cannot be revoked: it is DATA_DIR/api-token "
            "(STREAMBOOT_API_TOKEN); replace the token there and restart"
        )
    t = p.api_tokens.get(name)
    if t is None:
        raise not_found(f"no API token named {name!r}")
    if t["revoked_at"] is not None:
        raise conflict(f"API token {name!r} is already revoked")
    return [ApiTokenRevoked(token_name=name, revoked_by=by)]


def admin_action(name: str, role: str, method: str, path: str, status: int) -> list[Event]:
    """The audit record of one mutating API request, whatever its outcome."""
    outcome = "done" if status < 400 else "failed" if status >= 500 else "refused"
    return [
        AdminActionPerformed(
            token_name=name,
            role=role,  # type: ignore[arg-type]
            method=method,
            path=path,
            status=status,
            outcome=outcome,
        )
    ]
