"""The boot flow as a state machine: which phase a machine's boot is in, from its events.

A boot moves forward through these phases (docs/boot.md draws them)::

    discovered -> script served -> session open -> firmware read -> hand-off
               -> OS attached -> booted -> closed

Each event of the catalog (shared/events.py) that marks a phase moves the boot there; a
phase may be skipped (a machine with one vdisk gets no menu, so it goes from discovered to
session open; a kernel-direct boot loads its kernel from the boot service, not through its
session, so it has no firmware read; a client that skips PXE starts at session open). A
boot never moves back: an event of an earlier phase that arrives late (events of two
services reach the log in either order) is kept in the boot's history but leaves its
phase alone. ``closed`` and ``refused`` end a boot; what happens after belongs to the
next one.

Events that say something went wrong without ending the boot (a refused nonce, a refused
address, a client's own notice) are kept as the boot's problems. Pure functions over typed
events: ``streamboot events replay`` and the console's live boots use the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared.events import (
    CATALOG,
    BootMenuShown,
    BootRequested,
    ClientBooted,
    Event,
    HandoffRedeemed,
    NonceRefused,
    SessionAddressRefused,
    SessionAttached,
    SessionClosed,
    SessionConflictRejected,
    SessionEvent,
    SessionOpened,
)


class Phase(StrEnum):
    DISCOVERED = "discovered"
    SCRIPT_SERVED = "script served"
    SESSION_OPEN = "session open"
    FIRMWARE_READ = "firmware read"
    HANDOFF = "hand-off"
    OS_ATTACHED = "OS attached"
    BOOTED = "booted"
    CLOSED = "closed"
    REFUSED = "refused"


# The phases of a boot that goes well, in order (the console draws them as its columns).
PHASES: tuple[Phase, ...] = (
    Phase.DISCOVERED,
    Phase.SCRIPT_SERVED,
    Phase.SESSION_OPEN,
    Phase.FIRMWARE_READ,
    Phase.HANDOFF,
    Phase.OS_ATTACHED,
    Phase.BOOTED,
    Phase.CLOSED,
)
ENDS = frozenset({Phase.CLOSED, Phase.REFUSED})
_RANK = {p: i for i, p in enumerate(PHASES)}
_RANK[Phase.REFUSED] = _RANK[Phase.CLOSED]

# Where each phase may go next: any later phase of PHASES (skips included); a boot that
# has not opened its session yet may also be refused.
TRANSITIONS: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({*PHASES, Phase.REFUSED}),
    Phase.REFUSED: frozenset(),
}
for _i, _p in enumerate(PHASES):
    _early = _RANK[_p] < _RANK[Phase.SESSION_OPEN]
    TRANSITIONS[_p] = frozenset({*PHASES[_i + 1 :], *([Phase.REFUSED] if _early else [])})

# Event types this module reads; anything else is neither a phase nor a problem.
PROBLEMS = (NonceRefused, SessionAddressRefused)
# A client's own notice (when the catalog has it) is kept like a problem.
NOTICE_TYPE = "ClientNotice"


def target(event: Event, current: Phase | None) -> Phase | None:
    """The phase ``event`` marks for a boot now in ``current``; None when it marks none."""
    match event:
        case BootRequested():
            return Phase.DISCOVERED
        case BootMenuShown():
            return Phase.SCRIPT_SERVED
        case SessionOpened():
            return Phase.SESSION_OPEN
        case SessionConflictRejected():
            return Phase.REFUSED
        case SessionAttached(protocol="nbd"):
            return Phase.OS_ATTACHED
        case SessionAttached(protocol="http"):
            # iPXE's sanboot reads its disk over HTTP; an OS never does.
            return Phase.FIRMWARE_READ
        case SessionAttached():
            # iSCSI: the firmware logs in first, the OS's own initiator logs in again.
            if current is not None and _RANK[current] >= _RANK[Phase.FIRMWARE_READ]:
                return Phase.OS_ATTACHED
            return Phase.FIRMWARE_READ
        case HandoffRedeemed():
            return Phase.HANDOFF
        case ClientBooted():
            return Phase.BOOTED
        case SessionClosed():
            return Phase.CLOSED
        case _:
            return None


@dataclass
class Step:
    """One event of a boot and the phase the boot was in after it."""

    at: datetime
    type: str
    phase: Phase | None
    moved: bool  # this event moved the boot to ``phase``


@dataclass
class BootFlow:
    """One boot of one machine as the state machine sees it."""

    mac: str | None = None
    session_id: str | None = None
    phase: Phase | None = None
    # When the boot reached each phase it went through.
    reached: dict[Phase, datetime] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.phase in ENDS

    @property
    def started(self) -> datetime | None:
        return self.steps[0].at if self.steps else None

    def advance(self, event: Event, at: datetime) -> bool:
        """Feed one event; True when it moved the boot to another phase."""
        self._identify(event)
        problem = _problem(event)
        if problem:
            self.problems.append(problem)
        to = target(event, self.phase)
        moved = to is not None and to in TRANSITIONS[self.phase]
        if moved:
            assert to is not None
            self.phase = to
            self.reached.setdefault(to, at)
        self.steps.append(Step(at, event.event_type(), self.phase, moved))
        return moved

    def _identify(self, event: Event) -> None:
        mac = getattr(event, "mac", None)
        if mac and self.mac is None:
            self.mac = mac
        sid = getattr(event, "session_id", None)
        if sid and self.session_id is None and not isinstance(event, SessionConflictRejected):
            self.session_id = sid

    def to_json(self) -> dict[str, object]:
        return {
            "mac": self.mac,
            "session_id": self.session_id,
            "phase": self.phase.value if self.phase else None,
            "reached": {p.value: t.isoformat() for p, t in self.reached.items()},
            "problems": self.problems,
        }


def starts_new_boot(flow: BootFlow | None, event: Event) -> bool:
    """Whether ``event`` begins a new boot rather than continuing ``flow``: a PXE request
    does unless the boot is still at its own first request (DHCP retries), and a session
    opening does once the boot ended or holds another session. Anything else belongs to
    the boot at hand (a detach that reaches the log after the close included)."""
    if flow is None:
        return True
    match event:
        case BootRequested():
            return flow.phase is not Phase.DISCOVERED
        case SessionOpened() | SessionConflictRejected():
            return flow.ended or flow.phase not in (None, Phase.DISCOVERED, Phase.SCRIPT_SERVED)
        case _:
            return False


def _problem(event: Event) -> str | None:
    match event:
        case NonceRefused():
            return f"hand-off refused from {event.client_addr}: {event.reason}"
        case SessionAddressRefused():
            return (
                f"{event.protocol} connection from {event.client_addr} refused "
                f"(session issued to {event.expected_addr})"
            )
        case _ if event.event_type() == NOTICE_TYPE:
            kind, text = getattr(event, "kind", None), getattr(event, "message", None)
            return f"client notice ({kind}): {text}" if kind else f"client notice: {text}"
        case _:
            return None


def belongs_to_a_boot(event: Event) -> bool:
    """Whether an event is part of a machine's boot (a PXE request, a menu, its session's
    events) rather than of the inventory (a device added, a vdisk promoted)."""
    return isinstance(event, BootRequested | BootMenuShown | SessionEvent) or (
        event.event_type() == NOTICE_TYPE
    )


def parse_event(type_: str, data: dict[str, object]) -> Event | None:
    """The typed event of a stored one; None for a type or shape this catalog does not know
    (an older or newer log), which then takes no part in the flow."""
    model = CATALOG.get(type_)
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValueError:
        return None


def run(events: list[tuple[Event, datetime]]) -> list[BootFlow]:
    """A machine's events (in log order) cut into boots, each run through the machine."""
    boots: list[BootFlow] = []
    for event, at in events:
        if not belongs_to_a_boot(event):
            continue
        current = boots[-1] if boots else None
        if starts_new_boot(current, event):
            current = BootFlow()
            boots.append(current)
        current.advance(event, at)
    return boots


def describe(type_: str, d: dict[str, Any]) -> str:
    """What one event of a boot says, in a few words (timelines, the console)."""
    match type_:
        case "BootRequested":
            return f"PXE request (arch {d.get('arch')})"
        case "BootMenuShown":
            return f"menu {d.get('vdisks')} default {d.get('default')} chosen {d.get('chosen')}"
        case "SessionOpened":
            return f"{d.get('vdisk')} v{d.get('version')} on {d.get('stream_node')}"
        case "SessionConflictRejected":
            return f"refused: {d.get('reason')}"
        case "SessionAttached":
            return f"{d.get('protocol')} from {d.get('client_addr')}"
        case "SessionDetached":
            return (
                f"{d.get('protocol')} gone ({d.get('reason')}), "
                f"{d.get('bytes_read', 0):,} B read, {d.get('bytes_written', 0):,} B written"
            )
        case "BlocksRequested":
            extents = d.get("extents", [])
            return f"{len(extents)} extents, {sum(x[2] for x in extents):,} B"
        case "SessionClosed":
            return (
                f"closed ({d.get('reason')}), {d.get('bytes_read', 0):,} B read, "
                f"{d.get('bytes_written', 0):,} B written"
            )
        case "HandoffRedeemed":
            return f"initramfs redeemed its nonce from {d.get('client_addr')}"
        case "NonceRefused":
            return f"nonce refused from {d.get('client_addr')}: {d.get('reason')}"
        case "ClientBooted":
            return "the OS says it has booted"
        case "ClientNotice":
            return f"{d.get('kind')}: {d.get('message')}"
        case _:
            return ""
