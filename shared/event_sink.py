"""A non-blocking event sink for hot paths: events are queued and appended in batches.

The data plane must never wait on the bus to serve a block, so its events (attachments,
block-access batches) go through this queue. A background task appends them in order
through :class:`EventClient`, retrying while the registry or NATS is away.
"""

from __future__ import annotations

import asyncio
import logging

from shared.envelope import Envelope
from shared.event_log import EventClient
from shared.events import Event, envelope
from shared.telemetry import current_traceparent

log = logging.getLogger("streamboot.event_sink")

MAX_BATCH = 256
# Past this many unsent events the oldest go, loudly: the bus has been away for a long time.
MAX_QUEUED = 200_000


class QueuedEventSink:
    def __init__(self, client: EventClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self.dropped = 0

    async def emit(self, event: Event, correlation_id: str | None) -> None:
        self.put(event, correlation_id)

    def put(self, event: Event, correlation_id: str | None = None) -> None:
        """Queue an event (from synchronous code too): in the log once the registry has it."""
        if self._queue.qsize() >= MAX_QUEUED:
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("event log unreachable: %d queued events dropped so far", self.dropped)
        self._queue.put_nowait(
            envelope(event, correlation_id=correlation_id, traceparent=current_traceparent())
        )

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            while True:
                try:
                    await self._client.append(batch, retry_for_s=60)
                    for _ in batch:
                        self._queue.task_done()
                    break
                except Exception as exc:
                    log.warning("could not append %d events (%s); retrying", len(batch), exc)
                    await asyncio.sleep(1)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Give queued events a chance to reach the log before the process exits."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.error("stopping with %d events not yet in the log", self._queue.qsize())
