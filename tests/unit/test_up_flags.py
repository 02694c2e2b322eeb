"""`streamboot up`'s boot flags turn into the settings every service reads."""

from __future__ import annotations

import os

import pytest
import typer

from streamboot.commands.up import DhcpMode, boot_environment, port_warnings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STREAMBOOT_"):
            monkeypatch.delenv(key)


def test_interface_gives_the_service_address_and_nats_stays_private() -> None:
    env = boot_environment("lo", DhcpMode.proxy, None, None)
    assert env["STREAMBOOT_BIND_HOST"] == "127.0.0.1"
    assert env["STREAMBOOT_PUBLIC_HOST"] == "127.0.0.1"
    assert env["STREAMBOOT_DHCP_INTERFACE"] == "lo"
    assert env["STREAMBOOT_DHCP_MODE"] == "proxy"
    assert "STREAMBOOT_NATS_PORT" not in env and "STREAMBOOT_POSTGRES_PORT" not in env


def test_full_dhcp_needs_a_valid_range() -> None:
    with pytest.raises(typer.BadParameter, match="--dhcp-range START,END"):
        boot_environment(None, DhcpMode.full, None, None)
    with pytest.raises(typer.BadParameter, match="not an IPv4 address"):
        boot_environment(None, DhcpMode.full, "10.0.0.10,banana", None)
    env = boot_environment(None, DhcpMode.full, "10.0.0.10, 10.0.0.99", "10.0.0.1")
    assert (env["STREAMBOOT_DHCP_POOL_START"], env["STREAMBOOT_DHCP_POOL_END"]) == (
        "10.0.0.10",
        "10.0.0.99",
    )
    assert env["STREAMBOOT_PUBLIC_HOST"] == "10.0.0.1"


def test_unknown_interface_is_a_clear_error() -> None:
    with pytest.raises(typer.BadParameter, match="interface 'nosuch0' has no IPv4 address"):
        boot_environment("nosuch0", DhcpMode.off, None, None)


def test_root_takes_the_pxe_ports_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    env = boot_environment(None, DhcpMode.proxy, None, None)
    assert (env["STREAMBOOT_TFTP_PORT"], env["STREAMBOOT_DHCP_PORT"]) == ("69", "67")
    assert env["STREAMBOOT_DHCP_PXE_PORT"] == "4011"
    monkeypatch.setenv("STREAMBOOT_TFTP_PORT", "6969")
    assert "STREAMBOOT_TFTP_PORT" not in boot_environment(None, DhcpMode.proxy, None, None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "STREAMBOOT_DHCP_PORT" not in boot_environment(None, DhcpMode.proxy, None, None)
    assert "STREAMBOOT_DHCP_PORT" not in boot_environment(None, DhcpMode.off, None, None)


def test_a_range_outside_the_interfaces_network_is_refused() -> None:
    with pytest.raises(typer.BadParameter, match=r"10.0.0.10, 10.0.0.99 is outside lo's network"):
        boot_environment("lo", DhcpMode.full, "10.0.0.10,10.0.0.99", None)
    env = boot_environment("lo", DhcpMode.full, "127.0.0.10,127.0.0.99", None)
    assert env["STREAMBOOT_DHCP_POOL_END"] == "127.0.0.99"


def test_port_overrides_that_keep_pxe_from_booting_are_warned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert port_warnings(DhcpMode.full) == []
    monkeypatch.setenv("STREAMBOOT_DHCP_PORT", "16767")
    monkeypatch.setenv("STREAMBOOT_TFTP_PORT", "69")  # the PXE port itself: fine
    [line] = port_warnings(DhcpMode.full)
    assert "STREAMBOOT_DHCP_PORT=16767 replaces the PXE port 67" in line
    assert port_warnings(DhcpMode.off) == []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("STREAMBOOT_DHCP_PORT")
    lines = port_warnings(DhcpMode.proxy)
    assert len(lines) == 2 and all("not root" in x for x in lines)  # DHCP and PXE ports
