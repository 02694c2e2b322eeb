"""Tokens: session tokens drawn and hashed, and the admin API tokens' commands."""

from __future__ import annotations

import hashlib
import secrets

from services.registry.app.core import CommandCore
from services.registry.domain import api_tokens
from services.registry.projection import Record


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_token() -> str:
    """256 random bits, URL-safe, never starting with "-": a token is an argument of
    command lines (`streamboot session close TOKEN`, NBD clients' export names), where a
    leading dash reads as an option (1 token in 64 did)."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


class ApiTokenCommands(CommandCore):
    # --- admin API tokens -------------------------------------------------------------

    def api_principal(self, token: str) -> tuple[str, str] | None:
        """The (name, role) of a live API token; None for an unknown or revoked one."""
        name = self.projection.api_token_by_hash.get(token_hash(token))
        return None if name is None else (name, self.projection.api_tokens[name]["role"])

    async def create_api_token(self, name: str, role: str, *, by: str) -> Record:
        """A new token of ``role``: returned here once, only its hash is kept."""
        token = new_session_token()  # the same shape: 256 bits, never starting with "-"
        await self._execute(lambda p: api_tokens.create(p, name, role, token_hash(token), by))
        return {**self._api_token_view(name), "token": token}

    async def revoke_api_token(self, name: str, *, by: str) -> Record:
        await self._execute(lambda p: api_tokens.revoke(p, name, by))
        return self._api_token_view(name)

    def list_api_tokens(self) -> list[Record]:
        """The built-in admin first, then every named token, revoked ones included."""
        p = self.projection
        builtin = {
            "name": api_tokens.BOOTSTRAP_ADMIN,
            "role": "admin",
            "created_by": "DATA_DIR/api-token",
            "created_at": None,
            "revoked_at": None,
            "last_action_at": p.api_token_last_action.get(api_tokens.BOOTSTRAP_ADMIN),
        }
        return [builtin, *(self._api_token_view(n) for n in sorted(p.api_tokens))]

    def _api_token_view(self, name: str) -> Record:
        t = self.projection.api_tokens[name]
        view = {k: v for k, v in t.items() if k != "token_hash"}
        view["last_action_at"] = self.projection.api_token_last_action.get(name)
        return view

    async def record_admin_action(
        self, name: str, role: str, method: str, path: str, status: int
    ) -> None:
        await self._execute(lambda _p: api_tokens.admin_action(name, role, method, path, status))
