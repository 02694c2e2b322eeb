"""Test doubles of the stream servers' collaborators (services/stream/spec.py's protocols)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.stream.standalone import NullSink, StaticResolver
from shared.events import Event

__all__ = ["ListSink", "NullSink", "StaticResolver"]


@dataclass
class ListSink:
    """Collects emitted events with their correlation ids."""

    events: list[tuple[Event, str | None]] = field(default_factory=list)

    async def emit(self, event: Event, correlation_id: str | None) -> None:
        self.events.append((event, correlation_id))

    def of_type(self, cls: type[Event]) -> list[Event]:
        return [e for e, _ in self.events if isinstance(e, cls)]
