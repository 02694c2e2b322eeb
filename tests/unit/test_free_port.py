"""Ports picked for `*_PORT=0` (streamboot/embedded/proc.py) lie below the kernel's
ephemeral range, so no outgoing connection can take one before its server binds it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streamboot.embedded import proc
from streamboot.embedded.proc import ephemeral_port_floor, free_port


def test_a_picked_port_is_below_the_ephemeral_range_and_free_for_tcp_and_udp() -> None:
    floor = ephemeral_port_floor()
    for _ in range(20):
        port = free_port()
        assert proc.PICKED_PORT_FLOOR <= port < floor
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))


def test_a_port_held_by_a_server_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        # Only the held port and one other lie in the range picked from.
        monkeypatch.setattr(proc, "PICKED_PORT_FLOOR", taken)
        monkeypatch.setattr(proc, "ephemeral_port_floor", lambda: taken + 2)
        got = {free_port() for _ in range(10)}
    assert taken not in got


def test_without_room_below_the_ephemeral_range_any_free_port_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proc, "ephemeral_port_floor", lambda: proc.PICKED_PORT_FLOOR)
    port = free_port()
    assert port > 0
    assert not proc.port_in_use("127.0.0.1", port)


def test_up_never_hands_out_one_picked_port_twice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Nothing binds a picked port until its server starts, so two fields set to 0 could
    draw the same one: `up` then failed with "address already in use"."""
    from shared.settings import Settings
    from streamboot import supervisor

    draws = iter([20001, 20001, 20002, 20001, 20002, *range(20003, 20020)])
    monkeypatch.setattr(supervisor, "free_port", lambda _host="": next(draws))
    zeros = {field: 0 for field in supervisor.PORTS}
    settings = Settings(data_dir=tmp_path, **zeros)
    supervisor.Supervisor(settings)._resolve_ports()
    picked = [getattr(settings, field) for field in supervisor.PORTS]
    assert len(set(picked)) == len(picked) and 0 not in picked
