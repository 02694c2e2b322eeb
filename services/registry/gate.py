"""The admin API's door: who may call what, how much body they may send, and the audit trail.

An ASGI middleware in front of the routes that decides from the request head alone, before
a byte of the body is read: no or an unknown/revoked bearer token is 401, a role below the
route's is 403, a ``Content-Length`` over the cap is 413, each answered with
``Connection: close`` so the unread body is never taken in. A body that streams past the cap
is cut off with 413 too. Every mutating request of a known token, whatever its outcome
(403 included), appends an ``AdminActionPerformed`` naming the token and its role before
its answer goes out (in the same commit as the route's command where the route says what
it answers: ``audit.py``); an import's progress reports (``/jobs``) are the one exception.

Roles are ranked (viewer < operator < admin); what a route needs follows from its method and
path (:func:`required_role`), so a new route needs admin until it is listed here.

The web console (services/registry/console) logs in with the same tokens and calls the same
routes: its requests carry a session cookie instead of the bearer header, and a mutating one
must also carry the login's CSRF token in ``X-CSRF-Token`` (another site's page can send
the cookie, never that header). The console's own pages are open here and check their
login themselves (a browser is sent to the login page, not given a 401).
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.registry import audit
from services.registry.audit import AuditSlot
from services.registry.domain.api_tokens import BOOTSTRAP_ADMIN

log = logging.getLogger("streamboot.registry.api")

# (name, role) of the token a request came with.
Principal = tuple[str, str]
Authenticate = Callable[[str], Principal | None]
# Who a console request's login (its cookie) is, and whether its CSRF header matches.
CookieLogin = Callable[[Scope], Awaitable[tuple[Principal | None, bool]]]
Audit = Callable[[str, str, str, str, int], Awaitable[None]]

RANK = {"viewer": 0, "operator": 1, "admin": 2}
READS = frozenset({"GET", "HEAD"})
# Open to anyone: liveness and the API's own description.
OPEN_PATHS = frozenset(
    {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/", "/login"}
)
# The console's pages and assets: each page checks its login (services/registry/console).
OPEN_PREFIXES = ("/console",)
# What an operator may change: devices, their collections, assignments, sessions
# (everything else is admin's).
OPERATOR_PREFIXES = ("/devices", "/collections", "/assignments", "/sessions")
# Token management is admin's, reads included.
ADMIN_PREFIXES = ("/tokens",)
# Changes under an operator's prefix that are admin's: putting a device in maintenance
# lets it write the next version of a vdisk every device boots; CHAP secrets are credentials.
ADMIN_ACTIONS = re.compile(r"/devices/[^/]+/(maintenance|chap)|/collections/[^/]+/chap")
MAX_AUDIT_PATH = 512
# An import's progress reports (services/registry/jobs.py): they change nothing of the
# system (the import's version is audited when it is published), and an import sends
# one every half second, which would bury the audit trail.
UNAUDITED = re.compile(r"/jobs(/[^/]+(/end)?)?")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def required_role(method: str, path: str) -> str | None:
    """The least role that may make this request; None for the open paths."""
    if path in OPEN_PATHS or any(_under(path, p) for p in OPEN_PREFIXES):
        return None
    if any(_under(path, p) for p in ADMIN_PREFIXES):
        return "admin"
    if method in READS:
        return "viewer"
    if ADMIN_ACTIONS.fullmatch(path):
        return "admin"
    if any(_under(path, p) for p in OPERATOR_PREFIXES):
        return "operator"
    return "admin"


def audit_path(path: str) -> str:
    """The path as the audit trail records it: a session closed by its token
    (``DELETE /sessions/TOKEN``) is recorded without the token, which is a bearer secret."""
    parts = path.split("/")
    if len(parts) == 3 and parts[1] == "sessions" and parts[2] != "replay":
        try:
            uuid.UUID(parts[2])
        except ValueError:
            parts[2] = "<token>"
    return "/".join(parts)[:MAX_AUDIT_PATH]


class BodyTooLarge(Exception):
    pass


async def reply(
    send: Send, status: int, message: str, kind: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A short JSON error that closes the connection (the body, if any, stays unread)."""
    body = orjson.dumps({"error": message, "kind": kind})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_token(token: str, bootstrap: str, authenticate: Authenticate) -> Principal | None:
    """Who a token is: the built-in admin, a named token (``authenticate``), or nobody."""
    if secrets.compare_digest(token.encode(), bootstrap.encode()):
        return BOOTSTRAP_ADMIN, "admin"
    return authenticate(token)


def bearer(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def content_length(scope: Scope) -> int | None:
    """The declared body size; -1 when the header is not a number."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value) if value.isdigit() else -1
            except ValueError:  # more digits than int() takes
                return -1
    return None


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        bootstrap_token: str,
        authenticate: Authenticate,
        audit: Audit,
        max_body_bytes: int,
        cookie_login: CookieLogin | None = None,
    ) -> None:
        self.app = app
        self._bootstrap = bootstrap_token
        self._authenticate = authenticate
        self._cookie_login = cookie_login
        self._audit = audit
        self.max_body_bytes = max_body_bytes

    def principal(self, token: str) -> Principal | None:
        return check_token(token, self._bootstrap, self._authenticate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        needed = required_role(method, path)
        if needed is None:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        csrf_ok = True
        if token is None and self._cookie_login is not None:
            try:
                who, csrf_ok = await self._cookie_login(scope)
            except Exception as exc:  # the logins' table is not reachable now
                log.warning("registry: console login not checked: %s", exc)
                await reply(send, 503, "logins cannot be checked now; try again", "busy")
                return
        else:
            who = self.principal(token) if token else None
        if who is None:
            await reply(
                send,
                401,
                "missing, unknown or revoked API bearer token (see DATA_DIR/api-token "
                "and `streamboot token`)",
                "unauthorized",
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        name, role = who
        mutating = method not in READS
        if RANK[role] < RANK[needed]:
            if mutating:
                await self._record(name, role, method, path, 403)
            await reply(
                send,
                403,
                f"token {name!r} has role {role}; {method} {audit_path(path)} needs {needed} "
                "or above",
                "forbidden",
            )
            return
        if mutating and not csrf_ok:
            await self._record(name, role, method, path, 403)
            await reply(
                send, 403, "a console request without its login's X-CSRF-Token", "forbidden"
            )
            return
        declared = content_length(scope)
        if declared is not None and not 0 <= declared <= self.max_body_bytes:
            status = 413 if declared > 0 else 400
            if mutating:
                await self._record(name, role, method, path, status)
            if status == 413:
                await reply(send, 413, self._over_message(), "too_large")
            else:
                await reply(send, 400, "invalid Content-Length header", "invalid")
            return
        scope.setdefault("state", {})["principal"] = who
        await self._pass(scope, receive, send, who, mutating)

    def _over_message(self) -> str:
        return f"request body over the API's limit of {self.max_body_bytes} bytes"

    async def _pass(
        self, scope: Scope, receive: Receive, send: Send, who: Principal, mutating: bool
    ) -> None:
        """Run the route with the body counted as it streams in, and the answer audited."""
        received = 0
        over = False
        answered = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        # The route's command may commit the audit record with its own events (audit.py).
        slot = AuditSlot(*who, scope["method"], audit_path(scope["path"]))

        async def audited(message: Message) -> None:
            nonlocal answered
            if over:
                return  # the route's answer to a cut-off body: the 413 below replaces it
            if message["type"] == "http.response.start":
                answered = True
                status = message["status"]
                if mutating and slot.committed != status:
                    await self._record(*who, scope["method"], scope["path"], status)
            await send(message)

        token = audit.opened(slot) if mutating and not UNAUDITED.fullmatch(scope["path"]) else None
        try:
            await self.app(scope, counted, audited)
        except BodyTooLarge:
            pass
        except Exception:
            if mutating and not answered:  # the 500 goes out past this middleware
                await self._record(*who, scope["method"], scope["path"], 500)
            raise
        finally:
            if token is not None:
                audit.closed(token)
        if over and not answered:
            if mutating:
                await self._record(*who, scope["method"], scope["path"], 413)
            await reply(send, 413, self._over_message(), "too_large")

    async def _record(self, name: str, role: str, method: str, path: str, status: int) -> None:
        """Audit; a failure is logged, never turned into the request's answer: the action
        itself is done (or refused) already."""
        if UNAUDITED.fullmatch(path):
            return
        try:
            await self._audit(name, role, method, audit_path(path), status)
        except Exception as exc:
            log.error(
                "registry: could not record %s %s by token %r (status %d) in the log: %s",
                method,
                path,
                name,
                status,
                exc,
            )
