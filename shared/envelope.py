"""The event envelope: what every event in the log and on the bus carries around its data."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): sorts by creation time, unique without a lock."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One event: identity, position in its stream, causality, trace context, and the data.

    ``stream_id`` names the aggregate (``device-aa:bb:..``, ``vdisk-NAME``, ``session-ID``);
    ``version`` is the event's 1-based position within that stream, used for optimistic
    concurrency. ``position`` is the global position, set by the event store on append.
    """

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID = Field(default_factory=uuid7)
    type: str
    stream_id: str
    version: int = 0
    time: datetime = Field(default_factory=utcnow)
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    position: int | None = None

    def subject(self, prefix: str = "events") -> str:
        """The JetStream subject: ``events.<Type>.<stream kind>``."""
        kind = self.stream_id.split("-", 1)[0] or "misc"
        return f"{prefix}.{self.type}.{kind}"
