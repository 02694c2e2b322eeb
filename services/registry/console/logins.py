"""Console logins: an API token traded for a cookie, the browser never keeping the token.

A login holds the token in this process only; the browser gets a random login id in an
``HttpOnly; SameSite=Strict`` cookie and a CSRF token in the page. Each request is checked
against the token again (:class:`~services.registry.gate.Gate`), so a token revoked while
logged in stops working at once. Logins end after ``ttl_s`` of inactivity, at logout and
when the registry process restarts (log in again).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie

from starlette.types import Scope

COOKIE = "streamboot_console"
CSRF_HEADER = b"x-csrf-token"
# Past this many live logins the least recently used one is dropped (a login loop cannot
# grow the table without bound).
MAX_LOGINS = 1000


@dataclass
class Login:
    token: str
    csrf: str
    name: str
    role: str
    seen: float


class Logins:
    def __init__(self, ttl_s: float = 12 * 3600) -> None:
        self.ttl_s = ttl_s
        self._by_id: dict[str, Login] = {}

    def create(self, token: str, name: str, role: str) -> str:
        now = time.monotonic()
        self._expire(now)
        if len(self._by_id) >= MAX_LOGINS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].seen)
            del self._by_id[oldest]
        login_id = secrets.token_urlsafe(32)
        self._by_id[login_id] = Login(token, secrets.token_urlsafe(24), name, role, now)
        return login_id

    def end(self, login_id: str | None) -> None:
        if login_id:
            self._by_id.pop(login_id, None)

    def get(self, login_id: str | None) -> Login | None:
        login = self._by_id.get(login_id or "")
        now = time.monotonic()
        if login is None or now - login.seen > self.ttl_s:
            self.end(login_id)
            return None
        login.seen = now
        return login

    def _expire(self, now: float) -> None:
        for k in [k for k, v in self._by_id.items() if now - v.seen > self.ttl_s]:
            del self._by_id[k]

    def from_scope(self, scope: Scope) -> tuple[str | None, bool]:
        """The gate's view of a request: its login's API token (None: not logged in) and
        whether it carries that login's CSRF token."""
        cookie, csrf = None, None
        for key, value in scope["headers"]:
            if key == b"cookie":
                cookie = cookie_value(value.decode("latin-1"))
            elif key == CSRF_HEADER:
                csrf = value.decode("latin-1")
        login = self.get(cookie)
        if login is None:
            return None, False
        return login.token, csrf is not None and secrets.compare_digest(csrf, login.csrf)


def cookie_value(header: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no login
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None
