"""The registry process: event store, projection, NATS handlers, REST API, relay, sweeper.

Start: tracing -> NATS (+ JetStream stream) -> PostgreSQL event store -> projection from the
whole log -> append handler, FastStream handlers, API server, relay, log follower, session
sweeper, heartbeat. Stop (SIGTERM/SIGINT): the reverse, each step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from nats.aio.client import Client as NATS

from services.registry import vdisk_store
from services.registry.app import RegistryApp
from services.registry.console import LiveFeed
from services.registry.nats_api import build_broker
from services.registry.rest import build_api
from shared import bus
from shared.contracts.cache.client import all_write_caches
from shared.contracts.stream import announce_session
from shared.event_log import serve_appends
from shared.event_store import EventStore
from shared.fd_limit import fd_vitals, raise_soft_limit
from shared.heartbeat import Heartbeat, HeartbeatView
from shared.metrics import Headline, live_sessions_from, start_metrics_server
from shared.relay import EventRelay
from shared.settings import API_TOKEN_FILE, Settings, without_password
from shared.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger("streamboot.registry")


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


class RegistryService:
    """The registry's parts, started and stopped in order (tests drive it in-process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        settings = self.settings
        setup_tracing("registry", settings)
        nats_url = settings.require_nats_url()
        credentials = settings.nats_credentials("registry")
        self.nc = nc = await bus.connect(nats_url, "registry", credentials=credentials)
        js = nc.jetstream()
        await bus.ensure_event_stream(js)
        self.store = store = await EventStore.connect(settings.require_database_url())
        self.relay = relay = EventRelay(store, js)
        # The live instances, read by every session open: one watch, read from memory.
        self.beats = beats = HeartbeatView(js, settings.heartbeat_timeout_s)
        self._watch = asyncio.create_task(beats.run(), name="heartbeat-view")
        try:
            await beats.wait_loaded(10.0)
        except TimeoutError:
            log.warning("registry: heartbeats not loaded yet; session opens wait for them")
        self.app = app = RegistryApp(
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
        self._appends = await serve_appends(nc, store, lambda _stored: relay.poke())
        self.broker = build_broker(nats_url, app, credentials)
        await self.broker.start()
        # The console's live view: the log's recent past, then the event stream.
        self.feed = LiveFeed(store, nc)
        await self.feed.start()
        self.server = _ApiServer(
            uvicorn.Config(
                build_api(app, api_token(settings), settings.api_max_body_bytes, self.feed),
                host=settings.bind_host,
                port=settings.api_port,
                log_level="warning",
                lifespan="off",
            )
        )

        # Prometheus: this process serves its own /metrics (see shared/metrics.py).
        self.metrics = start_metrics_server("registry", settings)
        live_sessions_from("registry", lambda: len(app.projection.sessions))
        headline = Headline()

        def vitals() -> dict[str, Any]:
            p = app.projection
            return {
                "api": f"http://{settings.advertised_host}:{settings.api_port}",
                "position": p.position,
                "live_sessions": len(p.sessions),
                "load": len(p.sessions),
                "projection_errors": app.projection_errors(),
                "metrics": self.metrics.url,
                "figures": headline.figures(),
                "fds": fd_vitals(),
                "opens_refused_busy": app.opens_refused_busy,
            }

        self.heartbeat = Heartbeat(
            js, "registry", settings.node_id, settings.heartbeat_interval_s, vitals
        )
        self.tasks = [
            asyncio.create_task(self.server.serve(), name="api"),
            asyncio.create_task(relay.run(), name="relay"),
            asyncio.create_task(app.follow(), name="follow"),
            asyncio.create_task(
                _sweep_forever(app, settings.session_sweep_interval_s), name="sweep"
            ),
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
            asyncio.create_task(
                _store_upkeep_forever(app, settings.session_sweep_interval_s), name="upkeep"
            ),
            self._watch,
        ]
        log.info(
            "registry: serving API on http://%s:%d, NATS %s, %d devices, %d vdisks",
            settings.bind_host,
            settings.api_port,
            without_password(nats_url),
            len(app.projection.devices),
            len(app.projection.vdisks),
        )

    async def wait(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; a part that dies takes the service down with it."""
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopper, *self.tasks], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception():
                    raise RuntimeError(f"registry: {task.get_name()} failed") from task.exception()
        finally:
            stopper.cancel()

    async def stop(self) -> None:
        """Stop whatever was started (also after a start that failed half-way)."""
        if hasattr(self, "feed"):
            await self.feed.stop()  # ends the console's live streams, so the API can stop
        if hasattr(self, "server"):
            self.server.should_exit = True
        if self.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.tasks[0]), 5.0)
        if hasattr(self, "heartbeat"):
            await self.heartbeat.stop()
        if hasattr(self, "broker"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.broker.stop(), 5.0)
        tasks = [*self.tasks, *([self._watch] if hasattr(self, "_watch") else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if hasattr(self, "nc"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5.0)
        if hasattr(self, "store"):
            await self.store.close()
        if hasattr(self, "metrics"):
            await asyncio.to_thread(self.metrics.stop)
        log.info("registry: stopped")


async def run(settings: Settings, stop: asyncio.Event) -> None:
    svc = RegistryService(settings)
    try:
        await svc.start()
        await svc.wait(stop)
    finally:
        await svc.stop()
        shutdown_tracing()


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    soft, hard = raise_soft_limit()  # shared/fd_limit.py, as every service does at start
    log.info("registry: open-file limit %d (hard %d)", soft, hard)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    try:
        import uvloop

        uvloop.run(_main())
    except ImportError:
        asyncio.run(_main())
