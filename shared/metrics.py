"""Prometheus metrics of the whole system: every metric is defined here, once.

Each service process serves them at ``/metrics`` on its own port (``STREAMBOOT_METRICS_PORT``,
0 = a free port) and puts the address into its heartbeat as ``metrics``, so ``streamboot
status --json`` lists every scrape target. Services never define metrics of their own: they
call the hooks below, so a name means the same thing in every process.

Hooks for the services (all cheap; the data plane binds label children once, outside loops):

- ``count_boot()``                      one boot (the registry, when a boot session opens)
- ``bytes_counter(protocol, direction)`` a Counter child: ``.inc(n)`` per request served
- ``cache_counters(cache)``             (hits, misses) Counter children for a cache layer
- ``live_sessions_from(service, fn)``   the gauge reads ``fn()`` at each scrape
- ``write_cache_bytes_from(fn)``        the gauge reads ``fn()`` at each scrape
- ``time_request(service, op)``         context manager: one latency observation
- ``observe_request(service, op, s)``   the same, for callers that timed it themselves

Boots per minute and the cache hit ratio are rates, computed by Prometheus from the counters
(``rate(streamboot_boots_total[1m]) * 60``); :class:`Headline` computes the same figures in
process for the heartbeat, so ``streamboot status`` needs no Prometheus.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from shared.settings import Settings

# From a fast NBD read served from RAM (~50 us) to a slow cold read or registry call (10 s).
REQUEST_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)

SERVICE_UP = Gauge(
    "streamboot_service_up",
    "1 while this service process runs",
    ["service", "node", "version"],
)
SERVICE_UPTIME = Gauge(
    "streamboot_service_uptime_seconds",
    "Seconds since this service process started serving",
    ["service"],
)
LIVE_SESSIONS = Gauge(
    "streamboot_live_sessions",
    "Live boot sessions: system-wide in the registry, attached to this node in stream",
    ["service"],
)
BOOTS = Counter("streamboot_boots_total", "Boots started (boot sessions opened)")
BYTES_STREAMED = Counter(
    "streamboot_bytes_streamed_total",
    "Bytes moved by the data plane",
    ["protocol", "direction"],
)
CACHE_HITS = Counter("streamboot_cache_hits_total", "Block reads answered by a cache", ["cache"])
CACHE_MISSES = Counter(
    "streamboot_cache_misses_total", "Block reads a cache had to pass on", ["cache"]
)
WRITE_CACHE_BYTES = Gauge(
    "streamboot_write_cache_bytes", "Bytes held by the write caches of this instance"
)
REQUEST_SECONDS = Histogram(
    "streamboot_request_seconds",
    "Time to handle one request, by service and operation",
    ["service", "op"],
    buckets=REQUEST_BUCKETS,
)

# The service this process runs; the bus labels its latencies with it.
_identity = {"service": "client"}


def process_service() -> str:
    """The service name this process serves metrics as ("client" for CLIs and tests)."""
    return _identity["service"]


def count_boot(n: int = 1) -> None:
    BOOTS.inc(n)


def bytes_counter(protocol: str, direction: str) -> Any:
    """The counter child for e.g. ("nbd", "read"); keep it and call ``.inc(n)``."""
    return BYTES_STREAMED.labels(protocol=protocol, direction=direction)


def cache_counters(cache: str = "read") -> tuple[Any, Any]:
    """(hits, misses) counter children of one cache layer ("read", "write", "prefetch")."""
    return CACHE_HITS.labels(cache=cache), CACHE_MISSES.labels(cache=cache)


def live_sessions_from(service: str, count: Callable[[], float]) -> None:
    LIVE_SESSIONS.labels(service=service).set_function(count)


def write_cache_bytes_from(count: Callable[[], float]) -> None:
    WRITE_CACHE_BYTES.set_function(count)


def observe_request(service: str, op: str, seconds: float) -> None:
    REQUEST_SECONDS.labels(service=service, op=op).observe(seconds)


@contextlib.contextmanager
def time_request(service: str, op: str) -> Iterator[None]:
    """Observe the time the block takes, failed or not."""
    child = REQUEST_SECONDS.labels(service=service, op=op)
    started = time.perf_counter()
    try:
        yield
    finally:
        child.observe(time.perf_counter() - started)


def _total(metric: MetricWrapperBase, suffix: str = "") -> float:
    """Sum of a metric's samples (over all label sets) named ``<name><suffix>``."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                total += sample.value
    return total


class Headline:
    """The figures ``streamboot status`` shows, computed from this process's metrics.

    Rates come from the samples of the last minute (one per call: the heartbeat's period)."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._boots: deque[tuple[float, float]] = deque()

    def figures(self) -> dict[str, Any]:
        now = time.monotonic()
        boots = _total(BOOTS, "_total")
        self._boots.append((now, boots))
        while len(self._boots) > 2 and now - self._boots[1][0] >= self.WINDOW_S:
            self._boots.popleft()
        first_t, first_boots = self._boots[0]
        # Boots in the trailing window, per minute; under a minute of history this is the
        # count so far (never extrapolated from a few seconds).
        minutes = max(now - first_t, self.WINDOW_S) / 60.0
        hits, misses = _total(CACHE_HITS, "_total"), _total(CACHE_MISSES, "_total")
        return {
            "live_sessions": _total(LIVE_SESSIONS),
            "boots_total": boots,
            "boots_per_minute": round((boots - first_boots) / minutes, 2),
            "bytes_streamed": _total(BYTES_STREAMED, "_total"),
            "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "write_cache_bytes": _total(WRITE_CACHE_BYTES),
        }


@dataclass
class MetricsServer:
    """prometheus_client's own HTTP server (a daemon thread, so a busy event loop never
    delays a scrape); every path answers with the metrics, ``/metrics`` included."""

    httpd: WSGIServer
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _version() -> str:
    try:
        return package_version("streamboot")
    except PackageNotFoundError:
        return "unknown"


def start_metrics_server(service: str, settings: Settings) -> MetricsServer:
    """Serve this process's metrics on ``settings.metrics_port`` (0 = a free port) and label
    the process as ``service`` from now on."""
    _identity["service"] = service
    httpd, thread = start_http_server(
        settings.metrics_port, addr=settings.bind_host, registry=REGISTRY
    )
    started = time.monotonic()
    SERVICE_UP.labels(service=service, node=settings.node_id, version=_version()).set(1)
    SERVICE_UPTIME.labels(service=service).set_function(lambda: time.monotonic() - started)
    url = f"http://{settings.advertised_host}:{httpd.server_port}/metrics"
    return MetricsServer(httpd, thread, url)
