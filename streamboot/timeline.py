"""A device's boots as timelines, read from the event log: "why did lab-042 take three
minutes to boot this morning?"

Reads only through indexes: the device's own events by MAC (``events_mac``), then each of
its sessions' streams by stream id; never a scan of the log, so the answer stays fast on a
log of millions of events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.boot_flow import BootFlow, describe, parse_event
from shared.event_store import EventStore, StoredEvent
from shared.events import SessionDetached

# Events that make a boot start: the first packet (PXE), or the session for clients that
# skip PXE.
BOOT_STARTS = ("BootRequested", "SessionOpened")


@dataclass
class Step:
    at: datetime
    type: str
    detail: str
    since_start_s: float = 0.0
    since_previous_s: float = 0.0
    # The boot's phase after this step (shared/boot_flow.py); None before any.
    phase: str | None = None


@dataclass
class BootTimeline:
    mac: str
    session_id: str | None
    steps: list[Step] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    phase: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def started(self) -> datetime:
        return self.steps[0].at

    @property
    def duration_s(self) -> float:
        return self.steps[-1].since_start_s if self.steps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "session_id": self.session_id,
            "started": self.started.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "phase": self.phase,
            "problems": self.problems,
            "steps": [
                {
                    "at": s.at.isoformat(),
                    "type": s.type,
                    "detail": s.detail,
                    "since_start_s": round(s.since_start_s, 3),
                    "since_previous_s": round(s.since_previous_s, 3),
                    "phase": s.phase,
                }
                for s in self.steps
            ],
        }


def build_timelines(
    mac: str, device_events: Sequence[StoredEvent], session_events: dict[str, Sequence[StoredEvent]]
) -> list[BootTimeline]:
    """Group a device's events into boots: each boot starts at a BootRequested (or at a
    SessionOpened that no BootRequested preceded) and takes its session's events."""
    boots: list[BootTimeline] = []
    pending_pxe: list[StoredEvent] = []
    for e in device_events:
        if e.type == "BootRequested":
            if pending_pxe:  # a PXE request that led to no session: a boot of its own
                boots.append(_timeline(mac, None, pending_pxe))
            pending_pxe = [e]
        elif e.type == "BootMenuShown":
            pending_pxe.append(e)
        elif e.type in ("SessionOpened", "SessionConflictRejected"):
            sid = e.data.get("session_id")
            own = list(session_events.get(sid, [])) if e.type == "SessionOpened" else [e]
            boots.append(_timeline(mac, sid if e.type == "SessionOpened" else None,
                                   pending_pxe + own))  # fmt: skip
            pending_pxe = []
    if pending_pxe:
        boots.append(_timeline(mac, None, pending_pxe))
    return boots


# Block batches arrive once a second: the timeline keeps the first and the last of a run.
def _timeline(mac: str, session_id: str | None, events: Sequence[StoredEvent]) -> BootTimeline:
    events = sorted(events, key=lambda e: e.position)
    tl = BootTimeline(mac, session_id)
    blocks = [e for e in events if e.type == "BlocksRequested"]
    keep = {id(blocks[0]), id(blocks[-1])} if blocks else set()
    flow = BootFlow()
    for e in events:
        typed = parse_event(e.type, e.data)
        if typed is not None:
            flow.advance(typed, e.time)
        if isinstance(typed, SessionDetached):
            tl.bytes_read += typed.bytes_read
            tl.bytes_written += typed.bytes_written
        if e.type == "BlocksRequested" and id(e) not in keep:
            continue
        label = e.type
        if e.type == "BlocksRequested":
            label = "first block read" if id(e) == id(blocks[0]) else "last block batch"
        tl.steps.append(Step(e.time, label, describe(e.type, e.data), phase=flow.phase))
    tl.phase, tl.problems = flow.phase, flow.problems
    if tl.steps:
        start = tl.steps[0].at
        previous = start
        for step in tl.steps:
            step.since_start_s = (step.at - start).total_seconds()
            step.since_previous_s = (step.at - previous).total_seconds()
            previous = step.at
    return tl


async def device_timelines(
    store: EventStore, mac: str, since: datetime | None = None, limit: int = 100_000
) -> list[BootTimeline]:
    """The boots of one device, oldest first (indexed reads only)."""
    device_events = [
        e for e in await store.read_all(0, limit, mac=mac) if since is None or e.time >= since
    ]
    sessions = {
        e.data["session_id"]: await store.read_stream(f"session-{e.data['session_id']}")
        for e in device_events
        if e.type == "SessionOpened"
    }
    return build_timelines(mac, device_events, sessions)
