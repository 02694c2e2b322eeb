"""How the stream side waits for a cache service that does not answer (restarting, stopped,
NATS away): probes spaced from RETRY_FIRST_S doubling to RETRY_MAX_S, for up to the
session's outage grace (``CacheLink.outage_grace_s``), before the client gets EIO.

Both wait in :func:`keep_asking`: writes ride out an outage in the layer ``ride_out.py``
(what they ask again is a probe of the node, then everything it may have lost); session
opens (``wc.open``, ``rc.open``, the pulls of a write cache's blocks) and reads through the
cache service (:func:`retried_while_away`) just ask again: asking twice changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.contracts.cache import wire

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

T = TypeVar("T")


class Undelivered(Exception):
    """A change or FLUSH the cache node did not take. ``error``: why; None when a FLUSH was
    answered by a node process that started after the ranges it covers went out (its
    fsync may not cover them). ``opens``: how many times the cache had been opened again
    when the request went out (``recoverable`` of the layer that shipped it)."""

    def __init__(self, error: wire.CacheError | None, opens: int) -> None:
        super().__init__(error.strerror if error is not None else "answered by a restarted node")
        self.error = error
        self.opens = opens


async def keep_asking(
    request: Callable[[float], Awaitable[T]], grace_s: float, first_delay_s: float = RETRY_FIRST_S
) -> T:
    """``request(seconds_left)`` until it answers: again while it fails because no cache node
    answers, spaced from ``first_delay_s`` doubling to RETRY_MAX_S, for up to ``grace_s``.
    Its other errors, and the last such one past the grace, are raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    delay = first_delay_s
    while True:
        await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
        delay = min(max(delay * 2, RETRY_FIRST_S), RETRY_MAX_S)
        try:
            return await request(deadline - loop.time())
        except wire.CacheError as e:
            if not wire.transient(e) or loop.time() >= deadline:
                raise


async def retried_while_away(request: Callable[[], Awaitable[T]], grace_s: float, what: str) -> T:
    """``request()``; when no cache node answers, asked again (:func:`keep_asking`)."""
    try:
        return await request()
    except wire.CacheError as e:
        if not wire.transient(e):
            raise
        log.warning("%s: %s; asking again for up to %g s", what, e.strerror, grace_s)
    began = asyncio.get_running_loop().time()
    try:
        result = await keep_asking(lambda _left: request(), grace_s)
    except wire.CacheError as e:
        if wire.transient(e):
            waited = asyncio.get_running_loop().time() - began
            log.error("%s: %s for %.1f s: EIO", what, e.strerror, waited)
        raise
    log.warning("%s: answered after %.1f s", what, asyncio.get_running_loop().time() - began)
    return result
