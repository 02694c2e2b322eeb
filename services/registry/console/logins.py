"""Console logins: an API token traded for a cookie, kept in PostgreSQL.

The browser gets a random login id in an ``HttpOnly; SameSite=Strict`` cookie and a CSRF
token in the page (derived from the login id, so nothing more is stored). The database
keeps neither the login id nor the API token: a row holds the SHA-256 of each, so a read
of the table logs nobody in. Who a login is comes from its token's hash at each request
(:data:`WhoByHash`: the built-in admin's, or a named token of the projection), so a token
revoked while logged in stops working at once, in every registry process. A login ends
after ``ttl_s`` without use (its expiry slides forward as it is used), at logout, and never
because a registry restarts: every registry process of the system shares the table.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http.cookies import SimpleCookie

import asyncpg
from starlette.types import Scope

from services.registry.app import RegistryApp
from services.registry.domain.api_tokens import BOOTSTRAP_ADMIN
from services.registry.gate import Principal
from services.registry.side_table import SideTable

COOKIE = "streamboot_console"
CSRF_HEADER = b"x-csrf-token"
# Past this many live logins the ones closest to expiring are dropped (a login loop cannot
# grow the table without bound).
MAX_LOGINS = 1000
# A login's expiry is pushed forward when less than this is left of it: a page view is a
# read, not a write, most of the time.
SLIDE_MARGIN = timedelta(minutes=5)
# Any 64-bit constant: serialises the table's creation between registry processes.
SCHEMA_LOCK_KEY = 0x5EB0_10C1
SCHEMA = """
CREATE TABLE IF NOT EXISTS console_logins (
    id_hash text PRIMARY KEY,        -- SHA-256 of the cookie's login id
    token_hash text NOT NULL,        -- SHA-256 of the API token it logged in with
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS console_logins_expiry ON console_logins (expires_at);
"""
# (name, role) of the API token with this SHA-256, or None (unknown or revoked).
WhoByHash = Callable[[str], Principal | None]
PoolSource = Callable[[], asyncpg.Pool]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def csrf_of(login_id: str) -> str:
    """The login's CSRF token: another site's page can neither read it nor derive it (the
    login id is in an HttpOnly cookie), and it says nothing of the login id."""
    return hmac.new(login_id.encode(), b"streamboot console csrf", "sha256").hexdigest()


@dataclass
class Login:
    csrf: str
    name: str
    role: str


class Logins:
    def __init__(self, pool: PoolSource, who: WhoByHash, ttl_s: float = 12 * 3600) -> None:
        self._pool = pool
        self._who = who
        self.ttl = timedelta(seconds=ttl_s)
        self._table = SideTable(SCHEMA, SCHEMA_LOCK_KEY)

    @classmethod
    def for_app(cls, app: RegistryApp, bootstrap_token: str) -> Logins:
        """Logins of the registry's API tokens: the built-in admin's and the projection's
        named ones, in the event store's database."""
        bootstrap = sha256(bootstrap_token)

        def who(token_hash: str) -> Principal | None:
            if secrets.compare_digest(token_hash, bootstrap):
                return BOOTSTRAP_ADMIN, "admin"
            name = app.projection.api_token_by_hash.get(token_hash)
            return None if name is None else (name, app.projection.api_tokens[name]["role"])

        return cls(lambda: app.store.pool, who)

    async def create(self, token: str) -> str:
        """A new login of this API token (known to be valid): its id, for the cookie."""
        login_id = secrets.token_urlsafe(32)
        async with self._pool().acquire() as conn:
            await self._table.ready(conn)
            async with conn.transaction():
                await conn.execute("DELETE FROM console_logins WHERE expires_at < now()")
                await conn.execute(
                    "INSERT INTO console_logins (id_hash, token_hash, expires_at) "
                    "VALUES ($1, $2, now() + $3)",
                    sha256(login_id),
                    sha256(token),
                    self.ttl,
                )
                await conn.execute(
                    "DELETE FROM console_logins WHERE id_hash IN (SELECT id_hash FROM "
                    "console_logins ORDER BY expires_at DESC OFFSET $1)",
                    MAX_LOGINS,
                )
        return login_id

    async def end(self, login_id: str | None) -> None:
        if not login_id:
            return
        async with self._pool().acquire() as conn:
            await self._table.ready(conn)
            await conn.execute("DELETE FROM console_logins WHERE id_hash = $1", sha256(login_id))

    async def get(self, login_id: str | None) -> Login | None:
        """The live login with this id, its expiry pushed forward; None: log in again."""
        if not login_id:
            return None
        async with self._pool().acquire() as conn:
            await self._table.ready(conn)
            row = await conn.fetchrow(
                "SELECT token_hash, expires_at - now() AS left_ FROM console_logins "
                "WHERE id_hash = $1 AND expires_at > now()",
                sha256(login_id),
            )
            if row is None:
                return None
            who = self._who(row["token_hash"])
            if who is None:  # its token was revoked
                await conn.execute(
                    "DELETE FROM console_logins WHERE id_hash = $1", sha256(login_id)
                )
                return None
            if row["left_"] < self.ttl - SLIDE_MARGIN:
                await conn.execute(
                    "UPDATE console_logins SET expires_at = now() + $2 WHERE id_hash = $1",
                    sha256(login_id),
                    self.ttl,
                )
        return Login(csrf_of(login_id), *who)

    async def from_scope(self, scope: Scope) -> tuple[Principal | None, bool]:
        """The gate's view of a request: who its login is (None: not logged in) and
        whether it carries that login's CSRF token."""
        cookie, csrf = None, None
        for key, value in scope["headers"]:
            if key == b"cookie":
                cookie = cookie_value(value.decode("latin-1"))
            elif key == CSRF_HEADER:
                csrf = value.decode("latin-1")
        login = await self.get(cookie)
        if login is None:
            return None, False
        return (login.name, login.role), csrf is not None and secrets.compare_digest(
            csrf, login.csrf
        )


def cookie_value(header: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no login
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None
