"""The boot state machine over event sequences (shared/boot_flow.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.boot_flow import PHASES, TRANSITIONS, BootFlow, Phase, parse_event, run
from shared.events import (
    BootMenuShown,
    BootRequested,
    ClientBooted,
    Event,
    HandoffRedeemed,
    NonceRefused,
    SessionAttached,
    SessionClosed,
    SessionConflictRejected,
    SessionDetached,
    SessionOpened,
)

MAC = "52:54:00:00:00:01"
T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def opened(sid: str = "s1") -> SessionOpened:
    return SessionOpened(
        session_id=sid,
        mac=MAC,
        hostname="lab-001",
        machine_id="m",
        vdisk="demo",
        version=1,
        stream_node="n1",
        write_cache="server-disk",
        write_cache_persistence="discard",
    )


def attached(protocol: str, sid: str = "s1") -> SessionAttached:
    return SessionAttached(
        session_id=sid, stream_node="n1", protocol=protocol, client_addr="10.0.0.5"
    )


def timed(*events: Event) -> list[tuple[Event, datetime]]:
    return [(e, T0 + timedelta(seconds=i)) for i, e in enumerate(events)]


def phases_of(flow: BootFlow) -> list[Phase | None]:
    return [s.phase for s in flow.steps]


def test_a_kernel_direct_boot_walks_every_phase_but_the_firmware_read() -> None:
    [boot] = run(
        timed(
            BootRequested(mac=MAC),
            BootMenuShown(mac=MAC, vdisks=["a", "demo"], default="a", chosen="demo"),
            opened(),
            HandoffRedeemed(session_id="s1", client_addr="10.0.0.5"),
            attached("nbd"),
            ClientBooted(session_id="s1", mac=MAC),
            SessionClosed(session_id="s1", reason="client-gone"),
        )
    )
    assert phases_of(boot) == [
        Phase.DISCOVERED,
        Phase.SCRIPT_SERVED,
        Phase.SESSION_OPEN,
        Phase.HANDOFF,
        Phase.OS_ATTACHED,
        Phase.BOOTED,
        Phase.CLOSED,
    ]
    assert boot.mac == MAC and boot.session_id == "s1" and boot.ended
    assert boot.reached[Phase.BOOTED] == T0 + timedelta(seconds=5)
    assert Phase.FIRMWARE_READ not in boot.reached


def test_a_sanboot_reads_through_the_firmware_then_the_os_attaches() -> None:
    [boot] = run(timed(BootRequested(mac=MAC), opened(), attached("http"), attached("nbd")))
    assert phases_of(boot) == [
        Phase.DISCOVERED,
        Phase.SESSION_OPEN,
        Phase.FIRMWARE_READ,
        Phase.OS_ATTACHED,
    ]


def test_iscsi_is_the_firmware_first_and_the_os_on_its_second_login() -> None:
    [boot] = run(timed(opened(), attached("iscsi"), attached("iscsi")))
    assert phases_of(boot) == [Phase.SESSION_OPEN, Phase.FIRMWARE_READ, Phase.OS_ATTACHED]


def test_a_late_event_of_an_earlier_phase_never_moves_the_boot_back() -> None:
    [boot] = run(timed(opened(), attached("nbd"), attached("http"), BootMenuShown(
        mac=MAC, vdisks=["demo"], default="demo")))  # fmt: skip
    assert phases_of(boot) == [Phase.SESSION_OPEN, *[Phase.OS_ATTACHED] * 3]
    assert [s.moved for s in boot.steps] == [True, True, False, False]


def test_a_new_pxe_request_or_session_starts_the_next_boot() -> None:
    events = timed(
        BootRequested(mac=MAC),
        BootRequested(mac=MAC),  # a DHCP retry of the same boot
        opened("s1"),
        attached("nbd", "s1"),
        BootRequested(mac=MAC),  # the machine boots again without a close (power cut)
        opened("s2"),
        SessionClosed(session_id="s2", reason="bye"),
        SessionDetached(
            session_id="s2",
            stream_node="n1",
            protocol="nbd",
            client_addr="10.0.0.5",
            bytes_read=1,
            bytes_written=0,
        ),  # reaches the log after the close: still the same boot
        opened("s3"),  # a client that skips PXE
    )
    boots = run(events)
    assert [b.session_id for b in boots] == ["s1", "s2", "s3"]
    assert [b.phase for b in boots] == [Phase.OS_ATTACHED, Phase.CLOSED, Phase.SESSION_OPEN]
    assert len(boots[1].steps) == 4


def test_a_refused_session_ends_the_boot_and_a_refused_nonce_is_a_problem() -> None:
    refused, handed = run(
        timed(
            BootRequested(mac=MAC),
            SessionConflictRejected(session_id="x", mac=MAC, reason="already has a session"),
            BootRequested(mac=MAC),
            opened("s2"),
            NonceRefused(session_id="s2", client_addr="10.0.0.9", reason="wrong client address"),
        )
    )
    assert refused.phase is Phase.REFUSED and refused.ended and refused.session_id is None
    assert handed.phase is Phase.SESSION_OPEN
    assert handed.problems == ["hand-off refused from 10.0.0.9: wrong client address"]


def test_the_transition_table_only_goes_forward() -> None:
    for i, phase in enumerate(PHASES):
        assert TRANSITIONS[phase] >= set(PHASES[i + 1 :])
        assert not TRANSITIONS[phase] & set(PHASES[: i + 1])
    assert Phase.REFUSED in TRANSITIONS[Phase.DISCOVERED]
    assert Phase.REFUSED not in TRANSITIONS[Phase.SESSION_OPEN]
    assert TRANSITIONS[Phase.CLOSED] == frozenset() == TRANSITIONS[Phase.REFUSED]


def test_inventory_events_are_no_boot() -> None:
    from shared.events import DeviceRegistered

    boots = run(
        timed(DeviceRegistered(mac=MAC, machine_id="m", hostname="h"), BootRequested(mac=MAC))
    )
    assert [b.phase for b in boots] == [Phase.DISCOVERED]
    assert len(boots[0].steps) == 1


def test_stored_events_of_unknown_types_or_shapes_take_no_part() -> None:
    assert parse_event("NoSuchEvent", {}) is None
    assert parse_event("ClientBooted", {"session_id": "s1"}) is None  # mac missing
    assert parse_event("ClientBooted", {"session_id": "s1", "mac": MAC}) == ClientBooted(
        session_id="s1", mac=MAC
    )
