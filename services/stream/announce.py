"""Sessions announced before their client connects.

When the registry opens a boot session it tells the stream node it placed the session on
(``streamboot.stream.<node>.session.prepare``, body = what ``session.resolve`` answers for the
token, plus the token). The node opens the session at once: the write cache is placed at
the cache service and its files made while the client is still fetching its iPXE script, so
the client's first connection finds the session ready instead of waiting for two round
trips (registry, cache service).

A core NATS publish, not a request: an announcement that is lost, malformed or fails to open
costs only the time it would have saved (the client's first connection opens the session
itself, as without it). The token travels as it already does in ``session.resolve``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.stream.spec import ExportSpec
from shared.bus import subject_token

if TYPE_CHECKING:  # the registry imports this module: not the stream's data path
    from services.stream.sessions import SessionManager

log = logging.getLogger("streamboot.stream.announce")


def prepare_subject(node: str) -> str:
    """The subject only the stream node ``node`` listens on for announced sessions."""
    return f"streamboot.stream.{subject_token(node)}.session.prepare"


def spec_from_record(record: dict[str, Any]) -> ExportSpec:
    """The export of a session from the registry's ``session.resolve`` answer."""
    return ExportSpec(
        session_id=str(record["session_id"]),
        vdisk=str(record["vdisk"]),
        version=int(record["version"]),
        layers=tuple(Path(p) for p in record["layers"]),
        size=int(record["size"]),
        write_cache=record.get("write_cache", "server-ram"),
        read_only=bool(record.get("read_only", False)),
        write_cache_persistence=record.get("write_cache_persistence", "discard"),
        mac=record.get("mac"),
        store=record.get("store", "local"),
        traceparent=record.get("boot_traceparent"),
        record_blocks=not record.get("replay_of"),
        client_addr=record.get("client_addr"),
    )


async def announce_session(nc: NATS, node: str, token: str, record: dict[str, Any]) -> None:
    """Tell stream node ``node`` to open the session ``token`` now (``record``: its
    ``session.resolve`` answer)."""
    await nc.publish(prepare_subject(node), json.dumps({**record, "token": token}).encode())


async def listen_for_announcements(nc: NATS, node: str, sessions: SessionManager) -> Subscription:
    """Open every session announced to this node ahead of its client."""

    async def on_announcement(msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            token = body["token"]
            if not isinstance(token, str) or not token:
                raise ValueError("no session token")
            spec = spec_from_record(body)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("stream: ignored a malformed session announcement (%s: %s)",
                        type(e).__name__, e)  # fmt: skip
            return
        sessions.prepare(token, spec)  # in the background: announcements never queue

    return await nc.subscribe(prepare_subject(node), cb=on_announcement)
