"""One session on this stream node: its stack, its connections, and the record of its block
accesses (BlocksRequested). Its lifecycle (open, attach, linger, close) belongs to the
``SessionManager`` (sessions.py), the only one that changes ``closed``, ``ready`` and the
linger timer."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from services.stream.path.stack import Stack
from services.stream.session_events import SessionEvents
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import BlocksRequested


class Session:
    def __init__(
        self,
        token: str,
        spec: ExportSpec,
        stack: Stack,
        events: SessionEvents,
        settings: StreamSettings,
    ) -> None:
        self.token = token
        self.spec = spec
        self.backend = stack.top
        # Its write cache's key at the cache service (None: none there).
        self.remote_key = stack.remote_key
        self.events = events
        self.settings = settings
        self.connections = 0
        # Live connections, each with an ``abort(reason)``: closed with the session.
        self.conns: set = set()
        self.closed = False
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.read_once = False
        # Opened on the registry's announcement; no client has connected yet.
        self.announced = False
        # Pending while an announced session attaches (its write cache being placed at the
        # cache service): no request is served before. None once attached.
        self.ready: asyncio.Future[None] | None = None
        self.record_blocks = spec.record_blocks
        self._extents: list[list] = []
        # The data its connections moved on this node (BlocksRequested carries the totals,
        # so a live session's bytes show before any connection ends).
        self.bytes_read = 0
        self.bytes_written = 0
        self._bytes_told = (0, 0)
        self._flusher: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    async def wait_ready(self) -> bool:
        """Wait until the session can serve; False if it closed instead (its attach failed)."""
        if self.ready is not None:
            await asyncio.shield(self.ready)
        return not self.closed

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    def record(self, op: Literal["r", "w"], offset: int, length: int) -> None:
        """Note a block access for BlocksRequested (adjacent accesses of one op merge)."""
        if not self.record_blocks:
            return
        if op == "r" and not self.read_once:
            self.read_once = True
            self.events.first_read(self.spec.traceparent, self.started_ns, offset, length)
        ext = self._extents
        if ext:
            last = ext[-1]
            if last[3] == op and last[1] + last[2] == offset:
                last[2] += length
                return
        ext.append([int((time.monotonic() - self.started) * 1000), offset, length, op])
        if len(ext) >= self.settings.events_batch_extents:
            self.flush_extents()
        elif self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.settings.events_interval_s, self.flush_extents)

    def moved(self, read: int, written: int) -> None:
        """Data a connection of the session sent or took (its SessionDetached counts it)."""
        self.bytes_read += read
        self.bytes_written += written
        if self.record_blocks and self._flusher is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.settings.events_interval_s, self.flush_extents)

    def flush_extents(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        totals = (self.bytes_read, self.bytes_written)
        if not self.record_blocks or (not self._extents and totals == self._bytes_told):
            return
        batch = [tuple(e) for e in self._extents]
        self._extents = []
        self._bytes_told = totals
        self.events.emit(
            BlocksRequested(
                session_id=self.session_id,
                vdisk=self.spec.vdisk,
                version=self.spec.version,
                extents=batch,  # type: ignore[arg-type]
                stream_node=self.settings.node_id,
                bytes_read=totals[0],
                bytes_written=totals[1],
            ),
            self.session_id,
        )
