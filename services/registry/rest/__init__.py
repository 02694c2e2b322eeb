"""The registry's admin REST API (FastAPI; OpenAPI at /docs).

Every route but ``/health`` (and the docs) needs ``Authorization: Bearer <token>`` of a
role that may call it: :mod:`services.registry.gate` checks that from the request head,
caps the body and records the audit trail. Domain errors map to statuses by kind:
invalid 400, refused 403, not_found 404, conflict 409, busy 503 with ``Retry-After`` (a
session open refused by back-pressure: nothing was opened); the body is
``{"error": message, "kind": kind}``. A body that does not fit its model is 400 too, with
a message naming the fields and the problems, never the input itself. Every route is one
call into :class:`~services.registry.app.RegistryApp`, the layer the NATS handlers call too.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from services.registry.app import RegistryApp
from services.registry.console import LiveFeed, Logins, mount_console
from services.registry.domain.errors import DomainError
from services.registry.gate import Gate, check_token
from services.registry.rest import bulk, devices, jobs, log, sessions, tokens, vdisks
from services.registry.rest.fields import domain_error_response, validation_message


def build_api(
    app: RegistryApp, api_token: str, max_body_bytes: int, feed: LiveFeed | None = None
) -> FastAPI:
    """The API and the web console at ``/``; ``api_token`` is the built-in admin's
    (bootstrap-admin) token, ``feed`` the console's live view (None: nothing live)."""
    api = FastAPI(
        title="streamboot registry",
        description="Devices, vdisks and their versions, assignments, boot sessions.",
        version="0.1.0",
        # /docs and /redoc are the console's, from assets shipped in the package.
        docs_url=None,
        redoc_url=None,
    )
    logins = Logins.for_app(app, api_token)
    # Inside the gate (added first: Starlette wraps the last added outermost).
    api.add_middleware(sessions.OpenSessionRoute, registry=app)
    api.add_middleware(
        Gate,
        bootstrap_token=api_token,
        authenticate=app.api_principal,
        audit=app.record_admin_action,
        max_body_bytes=max_body_bytes,
        cookie_login=logins.from_scope,
    )
    mount_console(
        api, app, logins, lambda token: check_token(token, api_token, app.api_principal), feed
    )

    @api.exception_handler(DomainError)
    async def domain_error(_req: Request, exc: DomainError) -> JSONResponse:
        return domain_error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": validation_message(exc.errors()), "kind": "invalid"}, status_code=400
        )

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "position": app.projection.position}

    # The gate checks the token; this only shows the bearer scheme in the OpenAPI docs.
    bearer = [Depends(HTTPBearer(auto_error=False))]
    for routes in (devices.routes, vdisks.routes, log.routes, tokens.routes, bulk.routes):
        api.include_router(routes(app), dependencies=bearer)
    # Sessions with their live bytes, imports and commits: from the console's live view.
    api.include_router(sessions.routes(app, feed), dependencies=bearer)
    api.include_router(jobs.routes(app, feed), dependencies=bearer)
    return api
