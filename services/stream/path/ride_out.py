"""The layer that rides out a cache node which does not take a session's changes.

A guest file system takes a failed write as a dead disk, so a cache node that does not
answer (restarting after an upgrade or a crash, stopped, the bus away) does not fail the
session's writes at once. They wait, unanswered, while the node is probed (spaced as
``outage.py`` says); once it answers, everything changed since the last acknowledged FLUSH
is sent again (in-flight batches were lost with the node) and the waiting requests are
answered. Only after the grace (``CacheLink.outage_grace_s``) do they fail with EIO,
naming the node. A node that restarted (a new process answers) gets the same recovery
without any request failing first.

The layer below is a ``RemoteWriteCache`` (:class:`Recoverable`): it raises :class:`Undelivered` for what
the node did not take, says whether a recovery may cure it, and probes and sends again.
This layer decides whether to wait and for how long, and runs one recovery for every
request waiting (the concurrency model: ``backend.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.stream.path.backend import Backend, Layer
from services.stream.path.outage import RETRY_FIRST_S, Undelivered, keep_asking
from shared.contracts.cache import wire

log = logging.getLogger(__name__)


class Recoverable(Backend, Protocol):
    """The layer below (``RemoteWriteCache``): what this layer asks of it."""

    key: str
    on_restart: Callable[[], None] | None

    @property
    def node(self) -> str: ...
    def recoverable(self, e: wire.CacheError, opens: int) -> bool: ...
    async def probe_and_resend(self, left_s: float) -> int: ...


class RideOut(Layer):
    def __init__(self, next_: Recoverable, grace_s: float) -> None:
        super().__init__(next_)
        self.remote = next_
        self.grace_s = grace_s
        # The recovery under way (an outage ridden out, or a restart): probe, then resend.
        self._outage: asyncio.Task[None] | None = None
        next_.on_restart = self._node_restarted

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._held(self.remote.pwrite(offset, data, fua), fua)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        await self._held(self.remote.zero(offset, length, fua), fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._held(self.remote.trim(offset, length, fua), fua)

    async def _held(self, change: Awaitable[None], fua: bool) -> None:
        """A change; one the node did not take is done once the recovery sent it again
        with everything unflushed (a FUA change once that is flushed too)."""
        try:
            await change
        except Undelivered as u:
            await self._ride_out(u)
            if fua:
                await self.flush()

    async def flush(self) -> None:
        while True:
            if self._outage is not None and not self._outage.done():
                await asyncio.shield(self._outage)  # what is being sent again goes first
            try:
                await self.remote.flush()
                return
            except Undelivered as u:
                if u.error is not None:
                    await self._ride_out(u)
                # else: a restarted node answered; its recovery runs: flush again after it

    async def _ride_out(self, u: Undelivered) -> None:
        """Wait for the recovery that may cure ``u``; raise its error when none may."""
        error = u.error
        assert error is not None
        if not self.remote.recoverable(error, u.opens):
            raise error
        # Shielded: a request given up by its client (connection closed) does not end the
        # ride-out the others wait on.
        await asyncio.shield(self._recovery(error))

    def _node_restarted(self) -> None:
        self._recovery(None)

    def _recovery(self, error: wire.CacheError | None) -> asyncio.Task[None]:
        """The recovery under way, or a new one."""
        if self._outage is None or self._outage.done():
            self._outage = asyncio.get_running_loop().create_task(self._recover(error))
            self._outage.add_done_callback(_retrieved)
        return self._outage

    async def _recover(self, error: wire.CacheError | None) -> None:
        """Probe the node until it answers, then send the unflushed ranges again; past the
        grace, raise the last error (every waiting request fails with it). ``error``: what
        failed (an outage), or None (the node restarted, and answers)."""
        key, node = self.remote.key, self.remote.node
        loop = asyncio.get_running_loop()
        began = loop.time()
        if error is not None:
            log.warning(
                "write cache %s: %s; holding the session's writes, retrying for up to %g s",
                key, error.strerror, self.grace_s,
            )  # fmt: skip
        try:
            resent = await keep_asking(
                self.remote.probe_and_resend,
                self.grace_s,
                first_delay_s=0.0 if error is None else RETRY_FIRST_S,
            )
        except wire.CacheError as e:
            if wire.transient(e):
                log.error(
                    "write cache %s: %s for %.1f s: its writes fail with EIO",
                    key, e.strerror, loop.time() - began,
                )  # fmt: skip
            raise
        log.warning(
            "write cache %s: cache node %s answers%s; sent again the %d bytes changed "
            "since the last flush",
            key, node, "" if error is None else f" again after {loop.time() - began:.1f} s",
            resent,
        )  # fmt: skip

    def close(self) -> None:
        if self._outage is not None:
            self._outage.cancel()  # the session is gone: nothing to hold any more
        super().close()


def _retrieved(task: asyncio.Task[None]) -> None:
    """A recovery nobody waits on (started by a restart) that failed: logged already."""
    if not task.cancelled():
        task.exception()
