"""Prometheus metrics over real HTTP, parsed with prometheus_client's own text parser.

- A real `python -m services.cache` process against the test nats-server: its heartbeat
  names its /metrics address, the scrape parses, the system's metric families are there
  with sane values, and SIGTERM closes the port.
- The bus hooks: serve_json / request_json over the real nats-server record one latency
  observation per request on each side, in the histogram's buckets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from shared import bus, metrics
from shared.heartbeat import read_heartbeats
from shared.settings import Settings
from tests.conftest import BusServer

START_TIMEOUT_S = 60.0
SYSTEM_FAMILIES = {
    # name (as the parser reports it, without _total) -> type
    "streamboot_service_up": "gauge",
    "streamboot_service_uptime_seconds": "gauge",
    "streamboot_live_sessions": "gauge",
    "streamboot_boots": "counter",
    "streamboot_bytes_streamed": "counter",
    "streamboot_cache_hits": "counter",
    "streamboot_cache_misses": "counter",
    "streamboot_write_cache_bytes": "gauge",
    "streamboot_request_seconds": "histogram",
}


async def scrape(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.get(url)
    reply.raise_for_status()
    assert reply.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(reply.text)}


def samples(family: Any, name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def wait_for_beat(nats_url: str, service: str, node: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                beats = await read_heartbeats(nc.jetstream(), 30.0)
                for beat in beats:
                    if beat["service"] == service and beat["node"] == node and "metrics" in beat:
                        return beat
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture
async def cache_process(
    nats_server: BusServer, tmp_path: Path
) -> AsyncIterator[tuple[Any, str, Path]]:
    node = f"metrics-test-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")}
    env.update(
        nats_server.env("cache"),
        STREAMBOOT_DATA_DIR=str(tmp_path / "data"),
        STREAMBOOT_NODE_ID=node,
        STREAMBOOT_METRICS_PORT="0",
        STREAMBOOT_HEARTBEAT_INTERVAL_S="0.5",
    )
    log = tmp_path / "cache.log"
    out = await asyncio.to_thread(log.open, "wb")
    with out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cache", env=env, stdout=out, stderr=out
        )
    try:
        yield proc, node, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_service_process_serves_metrics(
    nats_url: str, cache_process: tuple[Any, str, Path]
) -> None:
    proc, node, log = cache_process
    beat = await wait_for_beat(nats_url, "cache", node)
    url = beat["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
    # The heartbeat carries the headline figures `streamboot status` shows.
    assert beat["figures"]["boots_total"] == 0
    assert beat["figures"]["live_sessions"] == 0
    assert beat["figures"]["cache_hit_ratio"] is None  # no reads yet: no ratio, not 0

    families = await scrape(url)
    for name, kind in SYSTEM_FAMILIES.items():
        assert name in families, f"{name} missing; got {sorted(families)}"
        assert families[name].type == kind, (name, families[name].type)

    up = samples(families["streamboot_service_up"], "streamboot_service_up", service="cache")
    assert [(s.labels["node"], s.value) for s in up] == [(node, 1.0)]
    uptime = samples(
        families["streamboot_service_uptime_seconds"],
        "streamboot_service_uptime_seconds",
        service="cache",
    )
    assert len(uptime) == 1 and uptime[0].value >= 0
    boots = samples(families["streamboot_boots"], "streamboot_boots_total")
    assert [s.value for s in boots] == [0.0]
    assert [s.value for s in families["streamboot_write_cache_bytes"].samples] == [0.0]
    # prometheus_client's process collector: a real process with real memory.
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert rss > 10 * 2**20

    # Uptime grows between two scrapes (the gauge is read at scrape time).
    await asyncio.sleep(0.1)
    later = await scrape(url)
    uptime2 = samples(
        later["streamboot_service_uptime_seconds"],
        "streamboot_service_uptime_seconds",
        service="cache",
    )
    assert uptime2[0].value > uptime[0].value

    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await proc.wait() == 0, log.read_text()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


async def test_bus_requests_are_timed(nats_url: str) -> None:
    server = metrics.start_metrics_server("bus-test", Settings(bind_host="127.0.0.1"))
    nc = await bus.connect(nats_url, "metrics-test")
    subject = f"test.metrics.echo.{uuid.uuid4().hex[:8]}"

    async def echo(payload: Any, _msg: Any) -> Any:
        await asyncio.sleep(0.002)  # a handler that takes well over a millisecond
        return payload

    sub = await bus.serve_json(nc, subject, echo)
    try:
        for i in range(5):
            assert await bus.request_json(nc, subject, {"i": i}) == {"i": i}
        families = await scrape(server.url)
    finally:
        await sub.unsubscribe()
        await nc.close()
        await asyncio.to_thread(server.stop)

    hist = families["streamboot_request_seconds"]
    for op in (f"serve:{subject}", f"call:{subject}"):
        labels = {"service": "bus-test", "op": op}
        (count,) = samples(hist, "streamboot_request_seconds_count", **labels)
        (total,) = samples(hist, "streamboot_request_seconds_sum", **labels)
        assert count.value == 5, op
        assert total.value >= 5 * 0.001, op
        buckets = samples(hist, "streamboot_request_seconds_bucket", **labels)
        bounds = [float(b.labels["le"]) for b in buckets]
        assert bounds[0] == 50e-6 and bounds[-2] == 10.0 and bounds[-1] == float("inf")
        values = [b.value for b in buckets]
        assert values == sorted(values) and values[-1] == 5
        # Every request took >= 1 ms, so none fell in the sub-millisecond buckets.
        assert all(b.value == 0 for b in buckets if float(b.labels["le"]) < 1e-3)


def test_headline_figures_follow_the_hooks() -> None:
    """The heartbeat's figures move with the hooks the services call (as deltas: the
    registry is per process and other tests may have counted before)."""
    headline = metrics.Headline()
    before = headline.figures()
    metrics.count_boot()
    metrics.count_boot()
    metrics.bytes_counter("nbd", "read").inc(4096)
    metrics.bytes_counter("http", "read").inc(512)
    after = headline.figures()
    assert after["boots_total"] - before["boots_total"] == 2
    assert after["boots_per_minute"] >= 2  # both within the trailing minute
    assert after["bytes_streamed"] - before["bytes_streamed"] == 4096 + 512


def test_latency_buckets_are_inclusive_upper_bounds() -> None:
    hist = metrics.LatencyHistogram()
    for seconds in (50e-6, 51e-6, 10.0, 11.0):
        hist.observe(seconds)
    cumulative = dict(hist.buckets())
    assert cumulative[str(50e-6)] == 1  # exactly on a bound: in that bucket (le)
    assert cumulative[str(100e-6)] == 2
    assert cumulative[str(10.0)] == 3
    assert cumulative["+Inf"] == 4
    assert hist.sum == 50e-6 + 51e-6 + 10.0 + 11.0


def beat(service: str, alive: bool = True, **figures: float) -> dict[str, Any]:
    return {"service": service, "alive": alive, "figures": figures}


def test_system_figures_combine_the_instances() -> None:
    beats = [
        # Two registry replicas see the same 3 sessions; each counted the boots it opened.
        beat("registry", live_sessions=3, boots_per_minute=2),
        beat("registry", live_sessions=3, boots_per_minute=1),
        beat("stream", live_sessions=2, bytes_streamed=1000, cache_hits=3, cache_misses=1),
        beat("stream", live_sessions=1, bytes_streamed=500, cache_hits=1, cache_misses=3),
        beat("cache", write_cache_bytes=4096),
        beat("stream", alive=False, bytes_streamed=10**9),  # dead: not counted
        {"service": "boot", "alive": True},  # no figures (an older version): ignored
    ]
    assert metrics.system_figures(beats) == {
        "live_sessions": 3,
        "boots_per_minute": 3,
        "bytes_streamed": 1500,
        "cache_hit_ratio": 0.5,
        "write_cache_bytes": 4096,
    }
    # No registry reporting: the stream nodes' sessions; no reads: no ratio.
    only_stream = metrics.system_figures([beat("stream", live_sessions=2)])
    assert only_stream["live_sessions"] == 2 and only_stream["cache_hit_ratio"] is None
