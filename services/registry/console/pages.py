"""The console's routes: login, pages, fragments, the live stream, offline API docs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from services.registry.app import RegistryApp
from services.registry.console.live import LiveFeed, LiveView
from services.registry.console.logins import COOKIE, Login, Logins, cookie_value
from services.registry.domain import collections
from services.registry.domain.errors import DomainError
from services.registry.domain.vdisks import (
    BOOT_METHODS,
    MODES,
    PERSISTENCES,
    WRITE_CACHES,
    check_commit,
)
from services.registry.gate import RANK, Principal
from services.registry.jobs import Jobs
from shared.boot_flow import PHASES, describe, parse_event, run
from shared.events import CATALOG
from shared.identity import normalize_mac
from shared.metrics import system_figures
from shared.trace_spans import bars, boot_trace_id, read_traces
from shared.vdisk_store import PHASES as STORE_PHASES

HERE = Path(__file__).parent
STATIC = "/console/static"
DOCS_ASSETS = "/console/static/docs"
# Pages in the navigation: (path, title).
NAV = (
    ("/", "Dashboard"),
    ("/console/boots", "Boots"),
    ("/console/devices", "Devices"),
    ("/console/collections", "Collections"),
    ("/console/vdisks", "vdisks"),
    ("/console/sessions", "Sessions"),
    ("/console/events", "Events"),
    ("/console/audit", "Audit"),
)
MAX_FORM_BYTES = 4096
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
# Fragments a page can ask to be pushed on its live stream.
LIVE_TOPICS = ("dashboard", "boots", "jobs", "sessions")


class NotLoggedIn(Exception):
    pass


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _ago(at: datetime | str | float | None) -> str:
    if at is None:
        return "-"
    if isinstance(at, int | float):  # epoch seconds
        when = datetime.fromtimestamp(at, UTC)
    else:
        when = datetime.fromisoformat(at) if isinstance(at, str) else at
    s = (datetime.now(UTC) - when).total_seconds()
    if s < 60:
        return f"{max(0, int(s))} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    return when.strftime("%Y-%m-%d %H:%M")


def _secs(s: float | None) -> str:
    return "-" if s is None else (f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min")


async def _form_field(request: Request, name: str) -> str | None:
    """One field of a small urlencoded form; None past MAX_FORM_BYTES (the login page is
    open, before any token, so nothing bigger is read)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    values = parse_qs(body.decode("utf-8", "replace")).get(name)
    return values[0].strip() if values else None


@functools.cache
def _offline_redoc() -> bytes:
    """ReDoc's bundle with its one outside reference (the "API docs by Redocly" logo on
    a CDN) pointed at a shipped image: the docs page asks nothing of the internet."""
    bundle = (files("fastapi_offline") / "static" / "redoc.standalone.js").read_bytes()
    return bundle.replace(REDOC_CDN_LOGO, f"{DOCS_ASSETS}/favicon.png".encode())


def guarded(response: HTMLResponse) -> HTMLResponse:
    """A console page may load and call only its own origin (every asset ships with it),
    and is never framed by another site."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def affected(app: RegistryApp, vdisk: str) -> dict[str, Any]:
    """Who a change of a vdisk's stages reaches: the devices it is assigned to (directly or
    through their collection), split by tester flag, and its live sessions."""
    devices = [
        d for d in app.list_devices() if vdisk in (d.get("assignment") or {}).get("vdisks", [])
    ]
    return {
        "testers": [d["hostname"] for d in devices if d["tester"]],
        "others": [d["hostname"] for d in devices if not d["tester"]],
        "live_sessions": sum(1 for s in app.list_sessions() if s.get("vdisk") == vdisk),
    }


def trace_file(app: RegistryApp) -> Path:
    return app.settings.trace_file or app.settings.data_path("traces.jsonl")


def waterfalls(
    path: Path, trace_ids: list[str | None], since: datetime | None = None
) -> list[dict[str, Any]]:
    """Each boot's trace as waterfall rows (shared/trace_spans.py, the spans `streamboot
    trace show` draws), or why there is none; ``since``: when the earliest boot began (the
    span file is read back no further than that)."""
    if not path.exists():
        why = (
            f"no span file at {path}: set STREAMBOOT_TRACE_EXPORTER=jsonl (the embedded "
            "default), or read the trace in your OTLP backend"
        )
        return [{"why": why, "trace_id": t, "rows": []} for t in trace_ids]
    since_ns = None if since is None else int(since.timestamp() * 1e9)
    spans = read_traces(path, {t for t in trace_ids if t}, since_ns)
    out = []
    for trace_id in trace_ids:
        if trace_id is None:
            out.append({"why": "no session, so no trace", "rows": []})
            continue
        found = bars(spans[trace_id])
        out.append(
            {"trace_id": trace_id, "why": None if found["rows"] else "no spans yet", **found}
        )
    return out


def commit_view(app: RegistryApp, name: str) -> dict[str, Any]:
    """Whether the vdisk's last maintenance session can be committed now: its session,
    machine and the version it makes, or why not."""
    try:
        last = check_commit(app.projection, name)
    except DomainError as exc:
        return {"ready": False, "why": str(exc)}
    mac = last["mac"]
    host = (app.projection.devices.get(mac) or {}).get("hostname", mac)
    return {"ready": True, **last, "hostname": host, "next_version": last["version"] + 1}


def mount_console(
    api: FastAPI,
    app: RegistryApp,
    logins: Logins,
    principal: Callable[[str], Principal | None],
    feed: LiveFeed | None,
) -> None:
    """Add the console's routes to the API (none of them in its OpenAPI description)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(size=_size, ago=_ago, secs=_secs)
    env.globals.update(
        nav=NAV,
        phases=[p.value for p in PHASES],
        static=STATIC,
        phase_names=STORE_PHASES,
        # The policy form offers what the domain takes, so a vdisk's value is always one.
        policy_choices={
            "mode": MODES,
            "write_cache": WRITE_CACHES,
            "write_cache_persistence": PERSISTENCES,
            "boot_method": BOOT_METHODS,
        },
    )
    view = feed.view if feed is not None else LiveView()
    jobs = feed.jobs if feed is not None else Jobs(lambda: app.store.pool)
    api.mount(STATIC + "/docs", StaticFiles(directory=str(files("fastapi_offline") / "static")))
    api.mount(STATIC, StaticFiles(directory=str(HERE / "static")))

    async def login_of(request: Request) -> Login:
        # A token revoked while logged in ends the login (Logins.get).
        login = await logins.get(cookie_value(request.headers.get("cookie", "")))
        if login is None:
            raise NotLoggedIn
        return login

    @api.exception_handler(NotLoggedIn)
    async def to_login(request: Request, _exc: NotLoggedIn) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    def page(request: Request, name: str, login: Login, **ctx: Any) -> HTMLResponse:
        return guarded(
            templates.TemplateResponse(
                request,
                name,
                {
                    "login": login,
                    "can_operate": RANK[login.role] >= RANK["operator"],
                    "is_admin": login.role == "admin",
                    "path": request.url.path,
                    **ctx,
                },
            )
        )

    def fragment(request: Request, name: str, login: Login, **ctx: Any) -> HTMLResponse:
        return page(request, f"fragments/{name}.html", login, **ctx)

    # --- login -------------------------------------------------------------------------

    @api.get("/login", include_in_schema=False)
    async def login_form(request: Request) -> HTMLResponse:
        return guarded(templates.TemplateResponse(request, "login.html", {"error": None}))

    @api.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        token = await _form_field(request, "token")
        who = principal(token) if token else None
        if who is None:
            return templates.TemplateResponse(
                request,
                "login.html",
                {"error": "unknown or revoked token (see DATA_DIR/api-token, `streamboot token`)"},
                status_code=401,
            )
        login_id = await logins.create(token)
        out = RedirectResponse("/", status_code=303)
        out.set_cookie(COOKIE, login_id, httponly=True, samesite="strict", path="/")
        return out

    @api.post("/console/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await logins.end(cookie_value(request.headers.get("cookie", "")))
        out = RedirectResponse("/login", status_code=303)
        out.delete_cookie(COOKIE, path="/")
        return out

    # --- data of the pages ---------------------------------------------------------------

    async def dashboard_data() -> dict[str, Any]:
        beats = await app.instances()
        p = app.projection
        return {
            "instances": sorted(beats, key=lambda b: (b.get("service", ""), b.get("node", ""))),
            "figures": system_figures(beats),
            "live": view.figures(),
            "sessions_bytes": sum(
                s["bytes_read"] + s["bytes_written"] for s in view.with_bytes(app.list_sessions())
            ),
            "counts": {
                "devices": len(p.devices),
                "vdisks": len(p.vdisks),
                "sessions": len(p.sessions),
            },
        }

    async def sessions_data() -> dict[str, Any]:
        return {"sessions": view.with_bytes(await app.list_sessions_with_usage())}

    def boots_data() -> dict[str, Any]:
        boots = view.recent_boots(50)
        devices = app.projection.devices
        hosts = {b.mac: (devices.get(b.mac) or {}).get("hostname") for b in boots}
        return {"boots": boots, "hosts": hosts}

    async def devices_data(q: str) -> dict[str, Any]:
        words = q.lower().split()
        devices = [
            d
            for d in app.list_devices()
            if all(
                any(w in str(v).lower() for v in (d["mac"], d["hostname"], d["collection"]))
                for w in words
            )
        ]
        return {"devices": devices, "q": q, "vdisks": [v["name"] for v in app.list_vdisks()]}

    async def render_topic(
        request: Request, login: Login, topic: str, vdisk: str | None = None
    ) -> str:
        if topic == "dashboard":
            return fragment(request, "dashboard", login, **await dashboard_data()).body.decode()
        if topic == "jobs":
            return fragment(request, "jobs", login, jobs=await jobs.list(vdisk)).body.decode()
        if topic == "sessions":
            return fragment(request, "sessions", login, **await sessions_data()).body.decode()
        return fragment(request, "boots", login, **boots_data()).body.decode()

    # --- pages ---------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def dashboard(request: Request) -> HTMLResponse:
        login = await login_of(request)
        return page(request, "dashboard.html", login, **await dashboard_data())

    @api.get("/console/boots", include_in_schema=False)
    async def boots(request: Request) -> HTMLResponse:
        login = await login_of(request)
        return page(request, "boots.html", login, **boots_data())

    @api.get("/console/boots/{mac}", include_in_schema=False)
    async def boot_timeline(request: Request, mac: str) -> HTMLResponse:
        login = await login_of(request)
        device = app.show_device(mac)
        rows = await app.store.read_device(device["mac"])
        typed = [(parse_event(e.type, e.data), e) for e in rows]
        flows = list(reversed(run([(t, e.time) for t, e in typed if t is not None])))[:10]
        detail = {(e.type, e.time): describe(e.type, e.data) for _, e in typed}
        opened = {
            e.data.get("session_id"): boot_trace_id(e.data, e.traceparent)
            for e in rows
            if e.type == "SessionOpened"
        }
        traces = await asyncio.to_thread(
            waterfalls,
            trace_file(app),
            [opened.get(f.session_id) for f in flows],
            min((f.started for f in flows if f.started is not None), default=None),
        )
        return page(
            request,
            "timeline.html",
            login,
            device=device,
            flows=list(zip(flows, traces, strict=True)),
            detail=detail,
        )

    @api.get("/console/devices", include_in_schema=False)
    async def devices_page(
        request: Request, q: Annotated[str, Query(max_length=100)] = ""
    ) -> HTMLResponse:
        login = await login_of(request)
        return page(request, "devices.html", login, **await devices_data(q))

    @api.get("/console/collections", include_in_schema=False)
    async def collections_page(request: Request) -> HTMLResponse:
        login = await login_of(request)
        return page(
            request,
            "collections.html",
            login,
            collections=collections.view(app.projection),
            devices=app.list_devices(),
            vdisks=[v["name"] for v in app.list_vdisks()],
        )

    @api.get("/console/vdisks", include_in_schema=False)
    async def vdisks_page(request: Request) -> HTMLResponse:
        login = await login_of(request)
        return page(request, "vdisks.html", login, vdisks=app.list_vdisks(), jobs=await jobs.list())

    @api.get("/console/vdisks/{name}", include_in_schema=False)
    async def vdisk_page(request: Request, name: str) -> HTMLResponse:
        login = await login_of(request)
        return page(
            request,
            "vdisk.html",
            login,
            vdisk=app.vdisk_view(name),
            versions=list(reversed(app.versions(name))),
            affected=affected(app, name),
            commit=commit_view(app, name),
            jobs=await jobs.list(name),
        )

    @api.get("/console/sessions", include_in_schema=False)
    async def sessions_page(request: Request) -> HTMLResponse:
        login = await login_of(request)
        return page(request, "sessions.html", login, **await sessions_data())

    @api.get("/console/events", include_in_schema=False)
    async def events_page(
        request: Request,
        type: Annotated[str, Query(max_length=64)] = "",
        mac: Annotated[str, Query(max_length=64)] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> HTMLResponse:
        login = await login_of(request)
        events: list[dict[str, Any]] = []
        error = None
        try:
            events = await app.events(
                type_=type or None,
                mac=normalize_mac(mac) if mac else None,
                limit=limit,
                newest=True,
            )
        except DomainError as exc:
            error = str(exc)
        return page(
            request,
            "events.html",
            login,
            events=list(reversed(events)),
            type=type,
            mac=mac,
            error=error,
            types=sorted(CATALOG),
        )

    @api.get("/console/audit", include_in_schema=False)
    async def audit_page(request: Request) -> HTMLResponse:
        login = await login_of(request)
        rows = await app.events(type_="AdminActionPerformed", limit=300, newest=True)
        return page(request, "audit.html", login, rows=list(reversed(rows)))

    # --- fragments (swapped in after a change) -------------------------------------------

    @api.get("/console/fragments/{name}", include_in_schema=False)
    async def fragment_route(
        request: Request, name: str, q: Annotated[str, Query(max_length=100)] = ""
    ) -> HTMLResponse:
        login = await login_of(request)
        if name == "devices":
            return fragment(request, "devices", login, **await devices_data(q))
        if name == "sessions":
            return fragment(request, "sessions", login, **await sessions_data())
        if name in LIVE_TOPICS:
            return HTMLResponse(await render_topic(request, login, name))
        return HTMLResponse("unknown fragment", status_code=404)

    # --- the live stream -----------------------------------------------------------------

    @api.get("/console/stream", include_in_schema=False)
    async def stream(
        request: Request,
        topics: Annotated[str, Query(max_length=100)] = "dashboard",
        vdisk: Annotated[str | None, Query(max_length=64)] = None,
    ) -> StreamingResponse:
        login = await login_of(request)
        wanted = [t for t in topics.split(",") if t in LIVE_TOPICS]

        async def body() -> AsyncIterator[bytes]:
            # A refresh at least every few seconds as well: heartbeats (services, load)
            # change without an event.
            seen = -1
            yield b"retry: 2000\n\n"
            while not view.closed and not await request.is_disconnected():
                for topic in wanted:
                    html = await render_topic(request, login, topic, vdisk)
                    data = "".join(f"data: {line}\n" for line in html.splitlines())
                    yield f"event: {topic}\n{data}\n".encode()
                seen = await view.wait_change(seen, 5.0)
                await asyncio.sleep(0.2)  # a burst of events is one render

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- the API's own docs, from shipped assets -----------------------------------------

    @api.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="streamboot registry API",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @api.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @api.get("/console/redoc.js", include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(_offline_redoc(), media_type="text/javascript")

    @api.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="streamboot registry API",
            redoc_js_url="/console/redoc.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
