"""Sessions taken over by another stream node are dropped here.

A stream node keeps a session after its last connection (``session_linger_s``) and opens
announced sessions before their client (``announce.py``); meanwhile the client may be served
by another node, whose writes this node's mirror of the write cache never sees. The cache
service publishes every write-cache attach (``streamboot.cache.wc.attached``, with the
attaching process's ``CacheLink.instance``); every other stream process drops its sessions
on that cache, so a client coming back reopens the session here and pulls the cache again
instead of reading stale blocks.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.contracts.cache import wire

if TYPE_CHECKING:
    from services.stream.sessions import SessionManager

log = logging.getLogger("streamboot.stream.takeover")


async def listen_for_takeovers(nc: NATS, instance: str, sessions: SessionManager) -> Subscription:
    """Drop this process's (``instance``) sessions on write caches attached elsewhere."""

    async def on_attached(msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            key, by = body["key"], body["stream_instance"]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("stream: ignored a malformed write-cache attach notice (%s: %s)",
                        type(e).__name__, e)  # fmt: skip
            return
        if by != instance:
            sessions.taken_over(str(key), str(body.get("stream_node") or "?"))

    return await nc.subscribe(wire.WC_ATTACHED, cb=on_attached)
