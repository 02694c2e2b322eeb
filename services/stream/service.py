"""The stream service process: the data plane wired to the bus.

Tokens are resolved by asking the registry, or arrive announced by it ahead of the client
(``announce.py``); the data plane's events go through a queued sink into the log; a
``SessionClosed`` seen on the bus drops that session's state here, and so does the attach
of its write cache by another stream node (``takeover.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.stream.announce import listen_for_announcements, spec_from_record
from services.stream.path.cached_store import CacheLink
from services.stream.server import StreamServers
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from services.stream.takeover import listen_for_takeovers
from shared.bus import BusError, RemoteError, request_json
from shared.contracts.cache.client import CacheClient
from shared.contracts.registry import RESOLVE, SessionRecord
from shared.endpoints import host_port
from shared.event_log import closed_in_log
from shared.event_sink import QueuedEventSink
from shared.events import SessionClosed, received, subject_of
from shared.layer_paths import LayerPathError
from shared.service import ServiceRuntime, run_service

log = logging.getLogger("streamboot.stream")


class RegistryResolver:
    """Asks the registry what a session token opens."""

    def __init__(self, nc: NATS, vdisk_root: Path | None) -> None:
        self._nc = nc
        self._vdisk_root = vdisk_root

    async def resolve(self, token: str) -> ExportSpec | None:
        try:
            reply = await request_json(self._nc, RESOLVE, {"token": token}, timeout_s=5)
        except RemoteError as exc:
            if exc.kind == "not_found":
                return None
            raise
        try:
            record = SessionRecord.model_validate(reply)
            return spec_from_record(record, self._vdisk_root)
        except (LayerPathError, ValueError) as exc:
            # A malformed answer (layers outside the vdisk's folder, a bad CHAP record):
            # the session is refused, the node serves on.
            sid = reply.get("session_id") if isinstance(reply, dict) else None
            log.error("stream: refused session %s: %s", sid, exc)
            return None


async def start(rt: ServiceRuntime) -> None:
    sink = QueuedEventSink(rt.events)
    rt.spawn(sink.run(), "event-sink")
    settings = StreamSettings.from_settings(rt.settings)
    servers = StreamServers(RegistryResolver(rt.nc, settings.vdisk_root), sink, settings)
    if rt.settings.stream_use_cache:
        # Server-side write caches live in the cache service; non-local stores read through it.
        servers.sessions.cache = CacheLink(
            CacheClient(rt.nc),
            rt.settings.data_path("stream", "mirror"),
            outage_grace_s=rt.settings.stream_cache_outage_grace_s,
        )
    await servers.start()

    async def on_session_closed(msg: Msg) -> None:
        event = received(msg, SessionClosed)
        if event is None or not servers.sessions.holds(event.session_id):
            return
        sid = event.session_id
        # The message alone proves nothing (anyone may publish it): the log must say so.
        try:
            closed = await closed_in_log(rt.nc, sid)
        except BusError as exc:
            log.warning("session %s: cannot confirm its close (%s); kept", sid, exc)
            return
        if not closed:
            log.warning("session %s: a SessionClosed that is not in the log; ignored", sid)
        elif servers.close_session(sid):
            log.info("session %s closed by the registry: state dropped", sid)

    subs = [
        await rt.nc.subscribe(subject_of(SessionClosed), cb=on_session_closed),
        await listen_for_announcements(rt.nc, rt.settings.node_id, servers.sessions),
    ]
    if servers.sessions.cache is not None:
        link = servers.sessions.cache
        subs.append(await listen_for_takeovers(rt.nc, link.instance, servers.sessions))
        rt.on_reconnect(servers.sessions.drop_unused_remote_sessions)
    host = rt.settings.advertised_host

    def vitals() -> dict[str, object]:
        conns = sum(len(s.conns) for s in servers.sessions.sessions.values())
        return {
            "nbd": host_port(host, servers.nbd_port),
            "iscsi": host_port(host, servers.iscsi_port),
            "http_stream": f"http://{host_port(host, servers.http_port)}",
            "load": conns,
            "sessions": len(servers.sessions.sessions),
        }

    rt.vitals = vitals

    async def stop() -> None:
        for sub in subs:
            await sub.unsubscribe()
        await servers.stop()
        await sink.drain()

    rt.on_stop(stop)


def main() -> None:
    run_service("stream", start)
