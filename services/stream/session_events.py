"""What a stream node tells the world about its sessions: the events (through the sink,
never making the data path wait) and the spans of the boots' traces (a span per
connection, one for the first read). Owned by the ``SessionManager``; sessions and
connections report through it."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from opentelemetry import trace

from services.stream.spec import EventSink
from shared.events import Event, SessionAddressRefused, SessionAttached, SessionDetached
from shared.telemetry import context_from_traceparent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("streamboot.stream")

Protocol_ = Literal["nbd", "http", "iscsi"]


class SessionEvents:
    def __init__(self, sink: EventSink, node_id: str) -> None:
        self.sink = sink
        self.node_id = node_id
        self._emits: set[asyncio.Task[None]] = set()
        # Open connection spans of the boots' traces, by (session, protocol, client).
        self._spans: dict[tuple[str, str, str], trace.Span] = {}

    def attached(
        self,
        session_id: str,
        traceparent: str | None,
        protocol: Protocol_,
        client_addr: str,
        boot_firmware: bool = False,
    ) -> None:
        if traceparent:
            self._spans[(session_id, protocol, client_addr)] = tracer.start_span(
                f"{protocol} connection",
                context=context_from_traceparent(traceparent),
                attributes={
                    "streamboot.session_id": session_id,
                    "streamboot.client_addr": client_addr,
                    "streamboot.stream_node": self.node_id,
                },
            )
        self.emit(
            SessionAttached(
                session_id=session_id,
                stream_node=self.node_id,
                protocol=protocol,
                client_addr=client_addr,
                boot_firmware=boot_firmware,
            ),
            session_id,
        )

    def detached(
        self,
        session_id: str,
        protocol: Protocol_,
        client_addr: str,
        bytes_read: int,
        bytes_written: int,
        reason: str,
    ) -> None:
        span = self._spans.pop((session_id, protocol, client_addr), None)
        if span is not None:
            span.set_attribute("streamboot.bytes_read", bytes_read)
            span.set_attribute("streamboot.bytes_written", bytes_written)
            span.set_attribute("streamboot.detach_reason", reason)
            span.end()
        self.emit(
            SessionDetached(
                session_id=session_id,
                stream_node=self.node_id,
                protocol=protocol,
                client_addr=client_addr,
                bytes_read=bytes_read,
                bytes_written=bytes_written,
                reason=reason,
            ),
            session_id,
        )

    def address_refused(
        self, session_id: str, protocol: Protocol_, client_addr: str, expected_addr: str
    ) -> None:
        self.emit(
            SessionAddressRefused(
                session_id=session_id,
                stream_node=self.node_id,
                protocol=protocol,
                client_addr=client_addr,
                expected_addr=expected_addr,
            ),
            session_id,
        )

    def first_read(
        self, traceparent: str | None, started_ns: int, offset: int, length: int
    ) -> None:
        """The boot's first block read through this node: a span from the session's
        arrival here to the read."""
        if traceparent:
            tracer.start_span(
                "first read",
                context=context_from_traceparent(traceparent),
                start_time=started_ns,
                attributes={"streamboot.offset": offset, "streamboot.length": length},
            ).end()

    def emit(self, event: Event, correlation_id: str | None) -> None:
        """Hand an event to the sink without making the data path wait for it."""
        task = asyncio.get_running_loop().create_task(self._emit(event, correlation_id))
        self._emits.add(task)
        task.add_done_callback(self._emits.discard)

    async def _emit(self, event: Event, correlation_id: str | None) -> None:
        try:
            await self.sink.emit(event, correlation_id)
        except Exception:
            log.exception("event sink failed for %s", event.event_type())

    async def drain(self) -> None:
        while self._emits:
            await asyncio.gather(*list(self._emits), return_exceptions=True)
