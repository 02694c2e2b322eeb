"""The life of one service process: logging, uvloop, tracing, NATS, heartbeat, clean stop.

A service module provides ``async def start(rt: ServiceRuntime) -> None`` that starts its
servers and tasks (registering cleanups with ``rt.on_stop``), and a ``__main__`` that calls
:func:`run_service`. SIGTERM and SIGINT stop the process: first what ``rt.on_stopping``
registered (servers asked to finish their requests), then the tasks are cancelled, then the
``rt.on_stop`` cleanups run in reverse order of start. :func:`start_service` is the start
without the process (signals, waiting): tests run a service in their own event loop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shared import bus
from shared.event_log import EventClient
from shared.fd_limit import fd_vitals, raise_soft_limit
from shared.heartbeat import Heartbeat
from shared.metrics import Headline, start_metrics_server
from shared.settings import Settings
from shared.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger("streamboot.service")

StopHook = Callable[[], Awaitable[None]]
# How long a stopping service waits for its cancelled background tasks.
STOP_TASKS_TIMEOUT_S = 5.0


class ServiceRuntime:
    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.nc: NATS
        self.js: JetStreamContext
        self.events: EventClient
        # What the heartbeat reports besides the basics: a dict, or a callable returning one
        # (for figures that change, such as load).
        self.vitals: dict[str, Any] | Callable[[], dict[str, Any]] = {}
        self._stop_hooks: list[StopHook] = []
        self._stopping_hooks: list[StopHook] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopping = asyncio.Event()

    def on_stop(self, hook: StopHook) -> None:
        self._stop_hooks.append(hook)

    def on_stopping(self, hook: StopHook) -> None:
        """Call ``hook`` first when the service stops, while its tasks still run: a server
        task that finishes its requests when asked, instead of being cancelled mid-answer."""
        self._stopping_hooks.append(hook)

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after each NATS reconnection (core messages sent meanwhile are lost)."""
        self._reconnect_hooks.append(hook)

    def _reconnected(self) -> None:
        for hook in self._reconnect_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: error after reconnecting to NATS", self.name)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A background task that must keep running: if it dies, the service says so and stops."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)

        def done(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: task %s died: %r", self.name, name, t.exception())
                self.stopping.set()

        task.add_done_callback(done)
        self._tasks.append(task)
        return task

    async def connect(self) -> None:
        url = self.settings.require_nats_url()
        self.nc = await bus.connect(
            url,
            f"{self.name}@{self.settings.node_id}",
            credentials=self.settings.nats_credentials(self.name),
            on_reconnect=self._reconnected,
        )
        # The event stream is the registry's to create (shared/bus_access.py).
        self.js = self.nc.jetstream()
        if self.name in bus.APPENDING_SERVICES:  # the registry writes the log itself
            self.events = EventClient(self.nc, self.name)

    async def stop(self) -> None:
        for hook in reversed(self._stopping_hooks):
            try:
                await hook()
            except Exception:
                log.exception("%s: error while stopping", self.name)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TASKS_TIMEOUT_S)
            for task in pending:
                log.error("%s: task %s did not stop when cancelled", self.name, task.get_name())
        for hook in reversed(self._stop_hooks):
            try:
                await hook()
            except Exception:
                log.exception("%s: error while stopping", self.name)
        with contextlib.suppress(Exception):
            await self.nc.drain()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def freeze_startup_heap() -> None:
    """Put what the process built at start (modules, settings, clients, servers: it lives
    as long as the process) out of the cyclic GC's reach. A full collection then walks only
    what was made since: in a fresh stream or cache process one took 20-60 ms, in the
    middle of the first boot storm, holding every client of the process."""
    gc.collect()
    gc.freeze()


async def start_service(
    rt: ServiceRuntime, start: Callable[[ServiceRuntime], Awaitable[object]]
) -> None:
    """Connect, start the service's parts, then serve its /metrics and beat: every service
    process does this before it waits for a signal (``rt.stop()`` undoes it)."""
    settings = rt.settings
    setup_tracing(rt.name, settings)
    await rt.connect()
    await start(rt)
    # Every service serves /metrics; the heartbeat says where, with the headline figures.
    metrics_server = start_metrics_server(rt.name, settings)
    rt.on_stop(lambda: asyncio.to_thread(metrics_server.stop))
    headline = Headline()
    heartbeat = Heartbeat(
        rt.js,
        rt.name,
        settings.node_id,
        settings.heartbeat_interval_s,
        lambda: {
            **(rt.vitals() if callable(rt.vitals) else rt.vitals),
            "metrics": metrics_server.url,
            "figures": headline.figures(),
            "fds": fd_vitals(),
        },
    )
    rt.spawn(heartbeat.run(), "heartbeat")
    rt.on_stop(heartbeat.stop)


async def serve(name: str, start: Callable[[ServiceRuntime], Awaitable[object]]) -> None:
    settings = Settings()
    setup_logging(settings.log_level)
    soft, hard = raise_soft_limit()  # before anything opens a socket (shared/fd_limit.py)
    log.info("%s: open-file limit %d (hard %d)", name, soft, hard)
    rt = ServiceRuntime(name, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, rt.stopping.set)
    await start_service(rt, start)
    freeze_startup_heap()
    log.info("%s: running (node %s)", name, settings.node_id)
    await rt.stopping.wait()
    log.info("%s: stopping", name)
    await rt.stop()
    shutdown_tracing()


def run_service(name: str, start: Callable[[ServiceRuntime], Awaitable[object]]) -> None:
    """Entry point of ``python -m services.<name>``."""
    try:
        uvloop.run(serve(name, start))
    except bus.BusError as exc:
        # A clear one-line reason instead of a traceback: the supervisor shows it to the user.
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)
