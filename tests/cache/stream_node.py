"""A stream node in its own process, wired to the cache service, for kill -9 tests and benches.

    python -m tests.cache.stream_node NATS_URL EXPORTS_JSON [--port 0] [--publish-events]
        [--node-id ID]

EXPORTS_JSON maps tokens to ExportSpec fields. With ``--node-id``, sessions announced to
that node (``services/stream/announce.py``) are opened ahead of their client, as in the
stream service; with the cache service, sessions whose write cache another stream process
attached are dropped (``services/stream/takeover.py``). Prints ``READY <nbd_port> <http_port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import nats
import uvloop

from services.stream.announce import listen_for_announcements
from services.stream.path.cached_store import CacheLink
from services.stream.server import StreamServers
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from services.stream.takeover import listen_for_takeovers
from shared.contracts.cache.client import CacheClient
from shared.events import Event, envelope
from shared.service import freeze_startup_heap
from shared.settings import Settings
from tests.doubles import NullSink, StaticResolver


class BusSink:
    """Publishes each event where the registry's relay would (``events.<Type>.<kind>``).

    Stands in for the log + relay hop only: the cache service reads the same subjects."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc

    async def emit(self, event: Event, correlation_id: str | None) -> None:
        env = envelope(event, correlation_id=correlation_id)
        await self.nc.publish(env.subject(), env.model_dump_json().encode())


def export_specs(raw: dict[str, dict[str, Any]]) -> dict[str, ExportSpec]:
    """Tokens -> ExportSpec fields (layers as path strings), as ExportSpecs."""
    return {
        token: ExportSpec(**{**fields, "layers": tuple(Path(p) for p in fields["layers"])})
        for token, fields in raw.items()
    }


def load_exports(path: Path) -> dict[str, ExportSpec]:
    return export_specs(json.loads(path.read_text()))


async def serve(args: argparse.Namespace) -> None:
    servers: StreamServers | None = None

    async def reconnected() -> None:  # as the stream service does (service.py)
        if servers is not None and servers.sessions.cache is not None:
            servers.sessions.drop_unused_remote_sessions()

    nc = await nats.connect(args.nats_url, reconnected_cb=reconnected, max_reconnect_attempts=-1)
    settings = StreamSettings(
        nbd_port=args.port,
        http_port=0,
        session_linger_s=args.linger,
        node_id=args.node_id or "stream",
        **StreamSettings.tuning(Settings()),  # so STREAMBOOT_* reaches the benches
    )
    sink = BusSink(nc) if args.publish_events else NullSink()
    servers = StreamServers(StaticResolver(load_exports(Path(args.exports))), sink, settings)
    if not args.no_cache:
        client = CacheClient(nc, timeout_s=args.cache_timeout)
        servers.sessions.cache = CacheLink(client, outage_grace_s=args.outage_grace)
        await listen_for_takeovers(nc, servers.sessions.cache.instance, servers.sessions)
    await servers.start()
    if args.node_id:
        await listen_for_announcements(nc, args.node_id, servers.sessions)
    freeze_startup_heap()  # as the stream service does (shared/service.py)
    print(f"READY {servers.nbd_port} {servers.http_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await servers.stop()
    await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("nats_url")
    ap.add_argument("exports")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--linger", type=float, default=60.0)
    # How long writes wait for a cache node that does not answer (the stream's default).
    ap.add_argument("--outage-grace", type=float, default=30.0)
    ap.add_argument("--cache-timeout", type=float, default=10.0)  # each request's
    ap.add_argument("--publish-events", action="store_true")
    ap.add_argument("--node-id", help="open the sessions announced to this stream node id")
    ap.add_argument("--no-cache", action="store_true", help="write caches in process (compare)")
    logging.basicConfig(level=logging.INFO)
    uvloop.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
