"""The trace of each boot, begun at its first DHCP packet and carried across requests.

The boot service keeps no state of its own, yet a boot is several requests (DHCP, the iPXE
script, the hand-off, "booted"). Its root span's ids are chosen at the first PXE packet and
kept in a NATS KV bucket keyed by MAC, so whichever boot replica serves the next request
hangs its span under the same root; the registry writes the root span itself when the
session ends (it knows the end).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from shared.bus import key_value_bucket
from shared.telemetry import context_from_traceparent, new_traceparent

BUCKET = "streamboot_boot_traces"
# A boot that has not opened its session after this long starts a new trace next time.
TTL_S = 15 * 60.0
tracer = trace.get_tracer("streamboot.boot")


def _key(mac: str) -> str:
    return mac.lower().replace(":", "-")


class BootTraces:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> BootTraces:
        return cls(await key_value_bucket(js, BUCKET, TTL_S))

    async def begin(self, mac: str, started_ns: int | None = None) -> dict[str, Any]:
        """A new boot of ``mac``: its root traceparent and start time."""
        root = {"traceparent": new_traceparent(), "started_ns": started_ns or time.time_ns()}
        await self.kv.put(_key(mac), json.dumps(root).encode())
        return root

    async def current(self, mac: str) -> dict[str, Any]:
        """The boot in progress for ``mac`` (a client that skipped PXE begins one now)."""
        return await self.peek(mac) or await self.begin(mac)

    async def peek(self, mac: str) -> dict[str, Any] | None:
        """The boot in progress for ``mac``, if there is one."""
        try:
            entry = await self.kv.get(_key(mac))
        except KeyNotFoundError:
            return None
        return json.loads(entry.value) if entry.value else None

    async def end(self, mac: str) -> None:
        """The session is open: the next DHCP packet of this MAC is a new boot."""
        try:
            await self.kv.delete(_key(mac))
        except KeyNotFoundError:
            pass


def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    return {f"streamboot.{k}": v for k, v in attributes.items() if v is not None}


@contextmanager
def boot_span(
    name: str, boot: dict[str, Any] | None, start_ns: int | None = None, **attributes: Any
) -> Iterator[trace.Span]:
    """A span of this boot's trace, current while the block runs (none when the boot's
    trace is not known: a span of no trace would only be noise)."""
    if boot is None:
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(
        name,
        context=context_from_traceparent(boot["traceparent"]),
        start_time=start_ns,
        attributes=_attributes(attributes),
    ) as span:
        yield span


def record_boot_span(
    name: str, boot: dict[str, Any], start_ns: int, end_ns: int, **attributes: Any
) -> None:
    """A finished span of this boot's trace, for work timed elsewhere (a TFTP transfer)."""
    span = tracer.start_span(
        name,
        context=context_from_traceparent(boot["traceparent"]),
        start_time=start_ns,
        attributes=_attributes(attributes),
    )
    span.end(end_time=end_ns)
