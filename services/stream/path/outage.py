"""How the stream side waits for a cache service that does not answer (restarting, stopped,
NATS away): probes spaced from RETRY_FIRST_S doubling to RETRY_MAX_S, for up to the
session's outage grace (``CacheLink.outage_grace_s``), before the client gets EIO.

Writes ride out an outage in ``remote_write_cache.py`` (they also send again what the node
may have lost); reads through the cache service (:func:`retried_while_away`) just ask again:
a read changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.cache import wire

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

T = TypeVar("T")


async def retried_while_away(request: Callable[[], Awaitable[T]], grace_s: float, what: str) -> T:
    """``request()``, asked again while it fails because no cache node answers, for up to
    ``grace_s``; its other errors, and the last one past the grace, are raised."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    delay = RETRY_FIRST_S
    waiting = False
    while True:
        try:
            result = await request()
        except wire.CacheError as e:
            if not wire.transient(e):
                raise
            waited = loop.time() - began
            if waited + delay > grace_s:
                log.error("%s: %s for %.1f s: EIO", what, e.strerror, waited)
                raise
            if not waiting:
                waiting = True
                log.warning("%s: %s; asking again for up to %g s", what, e.strerror, grace_s)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if waiting:
            log.warning("%s: answered after %.1f s", what, loop.time() - began)
        return result
