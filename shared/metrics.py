"""Prometheus metrics of the whole system: every metric is defined here, once.

Each service process serves them at ``/metrics`` on its own port (``STREAMBOOT_METRICS_PORT``,
0 = a free port) and puts the address into its heartbeat as ``metrics``, so ``streamboot
status --json`` lists every scrape target. Services never define metrics of their own: they
call the hooks below, so a name means the same thing in every process.

Hooks for the services. The data plane's are plain objects, far cheaper than
prometheus_client's locked metrics (measured here: 0.2-0.3 us against 1.1-1.9 us per
update): get one once, outside the loop, and update it from the event loop thread.

- ``count_boot()``                       one boot (the registry, when a boot session opens)
- ``bytes_counter(protocol, direction)`` a :class:`Tally`: ``.inc(n)`` per request served
- ``cache_counters(cache)``              (hits, misses) tallies of a cache layer
- ``request_histogram(service, op)``     a :class:`LatencyHistogram`: ``.observe(seconds)``
- ``time_request(service, op)``          context manager: one latency observation
- ``observe_request(service, op, s)``    one observation, for callers that timed it
- ``live_sessions_from(service, fn)``    the gauge reads ``fn()`` at each scrape
- ``write_cache_bytes_from(fn)``         the gauge reads ``fn()`` at each scrape

``shared/service.py`` starts the server and fills the heartbeat for the services it runs; a
process that runs itself (the registry) calls ``start_metrics_server(name, settings)``, puts
its ``.url`` into its vitals as ``metrics`` and ``Headline().figures()`` as ``figures``, and
calls ``.stop()`` on the way out.

Boots per minute and the cache hit ratio are rates, computed by Prometheus from the counters
(``rate(streamboot_boots_total[1m]) * 60``); :class:`Headline` computes the same figures in
process for the heartbeat (``figures``), and :func:`system_figures` adds the live instances'
figures up, so ``streamboot status`` needs no Prometheus.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from itertools import accumulate
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.settings import Settings

_T = TypeVar("_T")

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
WRITE_CACHE_BYTES = Gauge(
    "streamboot_write_cache_bytes", "Bytes held by the write caches of this instance"
)


class Tally:
    """A hot-path counter: a bare int, several times cheaper than a prometheus_client
    Counter (no lock: update it from the event loop thread only; the scrape thread only
    reads it)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class LatencyHistogram:
    """A hot-path histogram over :data:`REQUEST_BUCKETS`, same threading rule as Tally."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(REQUEST_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        bounds = [*(str(b) for b in REQUEST_BUCKETS), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


class _HotPath(Collector):
    """The data plane's metrics: plain objects updated for almost nothing, turned into
    metric families only when Prometheus scrapes."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], Tally] = {}
        self.hits: dict[str, Tally] = {}
        self.misses: dict[str, Tally] = {}
        self.latency: dict[tuple[str, str], LatencyHistogram] = {}

    def collect(self) -> Iterator[Metric]:
        streamed = CounterMetricFamily(
            "streamboot_bytes_streamed",
            "Bytes moved by the data plane",
            labels=["protocol", "direction"],
        )
        for labels, tally in list(self.bytes.items()):
            streamed.add_metric(labels, tally.value)
        yield streamed
        for name, doc, tallies in (
            ("streamboot_cache_hits", "Block reads answered by a cache", self.hits),
            ("streamboot_cache_misses", "Block reads a cache had to pass on", self.misses),
        ):
            family = CounterMetricFamily(name, doc, labels=["cache"])
            for cache, tally in list(tallies.items()):
                family.add_metric([cache], tally.value)
            yield family
        latency = HistogramMetricFamily(
            "streamboot_request_seconds",
            "Time to handle one request, by service and operation",
            labels=["service", "op"],
        )
        for labels, hist in list(self.latency.items()):
            latency.add_metric(labels, hist.buckets(), hist.sum)
        yield latency


_hot = _HotPath()
REGISTRY.register(_hot)

# The service this process runs; the bus labels its latencies with it.
_identity = {"service": "client"}


def process_service() -> str:
    """The service name this process serves metrics as ("client" for CLIs and tests)."""
    return _identity["service"]


def _get(table: dict[Any, _T], key: Any, make: Callable[[], _T]) -> _T:
    """The object for ``key``, made on first use (no throwaway object per call)."""
    found = table.get(key)
    if found is None:
        found = table[key] = make()
    return found


def count_boot(n: int = 1) -> None:
    BOOTS.inc(n)


def bytes_counter(protocol: str, direction: str) -> Tally:
    """The tally for e.g. ("nbd", "read"): keep it and call ``.inc(n)`` per request."""
    return _get(_hot.bytes, (protocol, direction), Tally)


def cache_counters(cache: str = "read") -> tuple[Tally, Tally]:
    """(hits, misses) tallies of one cache layer ("read", "write", "prefetch")."""
    return _get(_hot.hits, cache, Tally), _get(_hot.misses, cache, Tally)


def live_sessions_from(service: str, count: Callable[[], float]) -> None:
    LIVE_SESSIONS.labels(service=service).set_function(count)


def write_cache_bytes_from(count: Callable[[], float]) -> None:
    WRITE_CACHE_BYTES.set_function(count)


def request_histogram(service: str, op: str) -> LatencyHistogram:
    """The histogram of one (service, op): keep it and call ``.observe(seconds)``."""
    return _get(_hot.latency, (service, op), LatencyHistogram)


def observe_request(service: str, op: str, seconds: float) -> None:
    request_histogram(service, op).observe(seconds)


class time_request:  # lower case: used like a function, `with time_request(...)`
    """Observe the time the block takes, failed or not."""

    __slots__ = ("_hist", "_started")

    def __init__(self, service: str, op: str) -> None:
        self._hist = request_histogram(service, op)

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        self._hist.observe(time.perf_counter() - self._started)


def _total(metric: Collector, suffix: str = "") -> float:
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
        hits = sum(t.value for t in list(_hot.hits.values()))
        misses = sum(t.value for t in list(_hot.misses.values()))
        return {
            "live_sessions": _total(LIVE_SESSIONS),
            "boots_total": boots,
            "boots_per_minute": round((boots - first_boots) / minutes, 2),
            "bytes_streamed": sum(t.value for t in list(_hot.bytes.values())),
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_ratio": _ratio(hits, misses),
            "write_cache_bytes": _total(WRITE_CACHE_BYTES),
        }


def _ratio(hits: float, misses: float) -> float | None:
    # No reads yet: no ratio (None), not a ratio of 0.
    return round(hits / (hits + misses), 4) if hits + misses else None


def system_figures(beats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The whole system's headline figures from the instances' heartbeats (``figures``),
    for ``streamboot status``. Every registry replica sees every session, so live sessions
    are the largest registry count (the stream nodes' sum when no registry reports); the
    rest add up over the live instances."""
    alive = [b for b in beats if b.get("alive") and isinstance(b.get("figures"), dict)]

    def values(key: str, service: str | None = None) -> list[float]:
        return [
            float(b["figures"].get(key) or 0)
            for b in alive
            if service is None or b.get("service") == service
        ]

    registry_sessions = values("live_sessions", "registry")
    hits, misses = sum(values("cache_hits")), sum(values("cache_misses"))
    return {
        "live_sessions": max(registry_sessions)
        if registry_sessions
        else sum(values("live_sessions", "stream")),
        "boots_per_minute": round(sum(values("boots_per_minute")), 2),
        "bytes_streamed": sum(values("bytes_streamed")),
        "cache_hit_ratio": _ratio(hits, misses),
        "write_cache_bytes": sum(values("write_cache_bytes")),
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
    host = settings.advertised_host
    url = f"http://{f'[{host}]' if ':' in host else host}:{httpd.server_port}/metrics"
    return MetricsServer(httpd, thread, url)
