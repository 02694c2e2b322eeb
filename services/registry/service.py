"""The registry process: event store, projection, NATS handlers, REST API, relay, sweeper.

Run by :func:`shared.service.run_service` like every service. Start: NATS (+ the JetStream
event stream, the registry's to create) -> PostgreSQL event store -> projection from the
whole log -> append handler, FastStream handlers, API server, relay, log follower, session
sweeper; then the shared heartbeat and /metrics. Stop (SIGTERM/SIGINT): the console's live
streams end and the API finishes its requests, then the reverse of start, each step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from nats.aio.client import Client as NATS

from services.registry.app import RegistryApp
from services.registry.connection_caps import ConnectionCaps
from services.registry.console import LiveFeed
from services.registry.nats_api import build_broker, serve_session_opens
from services.registry.rest import build_api
from shared import bus, vdisk_store
from shared.contracts.cache.client import all_write_caches
from shared.contracts.stream import announce_session
from shared.event_log import serve_appends
from shared.event_store import EventStore
from shared.heartbeat import HeartbeatView
from shared.metrics import live_sessions_from
from shared.relay import EventRelay
from shared.service import ServiceRuntime, run_service, start_service
from shared.settings import API_TOKEN_FILE, Settings, without_password

log = logging.getLogger("streamboot.registry")

# A stop step (the API finishing its requests, the NATS handlers draining) waits this long.
STOP_STEP_TIMEOUT_S = 5.0


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_token(settings: Settings) -> str:
    """The API bearer token: from the environment (`streamboot up` passes it), else the data
    dir's api-token file, created (0600) when missing so a standalone registry is never open."""
    if settings.api_token:
        return settings.api_token
    path = Path(settings.data_dir) / API_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.warning("registry: no STREAMBOOT_API_TOKEN; generated one into %s", path)
    return path.read_text().strip()


async def _sweep_forever(app: RegistryApp, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            closed = await app.sweep()
            if closed:
                log.info("registry: closed %d expired session(s)", len(closed))
        except Exception as exc:
            log.warning("registry: session sweep failed (%s); retrying", exc)


async def _store_upkeep_forever(app: RegistryApp, interval_s: float) -> None:
    """Merged layers nothing reads any more are removed; long chains merged (if set)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await app.sweep_layers()
            await app.auto_merge()
        except Exception as exc:
            log.warning("registry: vdisk store upkeep failed (%s); retrying", exc)


async def write_caches(nc: NATS, beats: HeartbeatView) -> tuple[list[dict[str, Any]], bool]:
    """Every cache node's write caches (scatter-gather; done once every live cache node,
    by its heartbeat, answered), and whether they all did."""
    beats = beats.read_now()
    nodes = {b["node"] for b in beats if b.get("service") == "cache" and b.get("alive")}
    return await all_write_caches(nc, nodes, timeout_s=1.0)


@dataclass
class RegistryParts:
    """What :func:`start` built that the tests and the heartbeat read."""

    app: RegistryApp
    beats: HeartbeatView


async def start(rt: ServiceRuntime) -> RegistryParts:
    settings = rt.settings
    nc, js = rt.nc, rt.js
    await bus.ensure_event_stream(js)
    store = await EventStore.connect(settings.require_database_url())
    rt.on_stop(store.close)
    relay = EventRelay(store, js)
    # The live instances, read by every session open: one watch, read from memory.
    beats = HeartbeatView(js, settings.heartbeat_timeout_s)
    rt.spawn(beats.run(), "heartbeat-view")
    try:
        await beats.wait_loaded(10.0)
    except TimeoutError:
        log.warning("registry: heartbeats not loaded yet; session opens wait for them")
    app = RegistryApp(
        store,
        settings,
        heartbeats=beats.read,
        on_appended=relay.poke,
        write_caches=lambda: write_caches(nc, beats),
        announce=lambda node, token, record: announce_session(nc, node, token, record),
    )
    await app.start()
    for stale in await asyncio.to_thread(vdisk_store.drop_stale_staging, app.vdisk_root):
        log.warning("registry: dropped the staging dir of an abandoned import: %s", stale)
    appends = await serve_appends(nc, store, lambda _stored: relay.poke())
    rt.on_stop(appends.unsubscribe)  # before the store closes: no append meets a closed pool
    opens = await serve_session_opens(nc, app)
    rt.on_stop(opens.unsubscribe)
    broker = build_broker(settings.require_nats_url(), app, settings.nats_credentials("registry"))
    await broker.start()
    rt.on_stop(lambda: _bounded(broker.stop()))
    # The console's live view: the log's recent past, then the event stream.
    feed = LiveFeed(store, nc, settings.node_id)
    await feed.start()
    caps = ConnectionCaps(
        settings.api_max_connections_per_address,
        settings.api_max_waiting,
        settings.api_head_timeout_s,
    )
    server = _ApiServer(
        uvicorn.Config(
            build_api(app, api_token(settings), settings.api_max_body_bytes, feed),
            host=settings.bind_host,
            port=settings.api_port,
            http=caps.protocol(),
            log_level="warning",
            lifespan="off",
        )
    )
    api_task = rt.spawn(server.serve(), "api")

    async def stop_api() -> None:
        await feed.stop()  # ends the console's live streams, so the API can stop
        server.should_exit = True
        await _bounded(asyncio.shield(api_task))

    rt.on_stopping(stop_api)
    live_sessions_from("registry", lambda: len(app.projection.sessions))

    def vitals() -> dict[str, Any]:
        p = app.projection
        return {
            "api": f"http://{settings.advertised_host}:{settings.api_port}",
            "position": p.position,
            "live_sessions": len(p.sessions),
            "load": len(p.sessions),
            "projection_errors": app.projection_errors(),
            "opens_refused_busy": app.opens_refused_busy,
        }

    rt.vitals = vitals
    rt.spawn(relay.run(), "relay")
    rt.spawn(app.follow(), "follow")
    rt.spawn(_sweep_forever(app, settings.session_sweep_interval_s), "sweep")
    rt.spawn(_store_upkeep_forever(app, settings.session_sweep_interval_s), "upkeep")
    log.info(
        "registry: serving API on http://%s:%d, NATS %s, %d devices, %d vdisks",
        settings.bind_host,
        settings.api_port,
        without_password(settings.require_nats_url()),
        len(app.projection.devices),
        len(app.projection.vdisks),
    )
    return RegistryParts(app, beats)


async def _bounded(aw: Awaitable[object]) -> None:
    """A stop step that may hang (a peer that does not answer) is given up on."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(aw, STOP_STEP_TIMEOUT_S)


class RegistryService:
    """The registry in this event loop, started and stopped as its process does (tests)."""

    def __init__(self, settings: Settings) -> None:
        self.rt = ServiceRuntime("registry", settings)

    async def start(self) -> None:
        async def started(rt: ServiceRuntime) -> None:
            parts = await start(rt)
            self.app, self.beats = parts.app, parts.beats

        try:
            await start_service(self.rt, started)
        except BaseException:
            await self.stop()  # whatever started half-way
            raise

    async def stop(self) -> None:
        await self.rt.stop()
        log.info("registry: stopped")


def main() -> None:
    run_service("registry", start)
