"""Wake-on-LAN: the magic packet a registered device is sent (a real UDP socket hears it)."""

from __future__ import annotations

import socket

import pytest

from services.registry.app import RegistryApp
from services.registry.domain.errors import DomainError
from services.registry.wake import magic_packet

MAC = "52:54:00:77:00:01"


def test_the_magic_packet_is_six_ff_then_the_mac_sixteen_times() -> None:
    packet = magic_packet(MAC)
    assert len(packet) == 102
    assert packet[:6] == b"\xff" * 6
    assert packet[6:] == bytes.fromhex("525400770001") * 16
    with pytest.raises(ValueError):
        magic_packet("52:54:00")


async def test_a_registered_device_is_woken_and_an_unknown_one_is_not(app: RegistryApp) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ear:
        ear.bind(("127.0.0.1", 0))
        ear.settimeout(10)
        app.settings = app.settings.model_copy(
            update={"wol_address": "127.0.0.1", "wol_port": ear.getsockname()[1]}
        )
        await app.add_device(MAC, hostname="lab-001")
        answer = await app.wake_device("52-54-00-77-00-01")
        assert answer == {
            "mac": MAC,
            "hostname": "lab-001",
            "sent_to": f"127.0.0.1:{ear.getsockname()[1]}",
        }
        assert ear.recv(200) == magic_packet(MAC)
        with pytest.raises(DomainError) as refused:
            await app.wake_device("52:54:00:77:00:99")
        assert refused.value.kind == "not_found"
        ear.settimeout(0.2)
        with pytest.raises(TimeoutError):
            ear.recv(200)
