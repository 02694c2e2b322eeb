"""`streamboot up`: run the whole system on this machine in the foreground."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from enum import StrEnum
from typing import Annotated

import typer

from streamboot.commands import DataDirOption
from streamboot.services import SERVICES

SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
# The ports PXE clients use; taken by default when run as root with DHCP on.
PRIVILEGED_BOOT_PORTS = {"tftp_port": 69, "dhcp_port": 67, "dhcp_pxe_port": 4011}


class DhcpMode(StrEnum):
    off = "off"
    proxy = "proxy"
    full = "full"


def _interface_ioctl(name: str, request: int, what: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), request, struct.pack("256s", name[:15].encode()))
        except OSError as exc:
            raise typer.BadParameter(
                f"interface {name!r} has no IPv4 {what} ({exc.strerror})",
                param_hint="--boot-interface",
            ) from None
    return socket.inet_ntoa(packed[20:24])


def interface_address(name: str) -> str:
    """The IPv4 address of a network interface (clear error when it has none)."""
    return _interface_ioctl(name, SIOCGIFADDR, "address")


def interface_network(name: str) -> ipaddress.IPv4Network:
    """The IPv4 network an interface is on (its address and netmask)."""
    address, mask = interface_address(name), _interface_ioctl(name, SIOCGIFNETMASK, "netmask")
    return ipaddress.IPv4Network(f"{address}/{mask}", strict=False)


def port_warnings(dhcp: DhcpMode) -> list[str]:
    """What keeps PXE clients from booting although `up` starts fine: with DHCP on, PXE
    firmware asks only on the standard ports (67, 69, 4011)."""
    if dhcp is DhcpMode.off:
        return []
    lines = []
    for field, port in PRIVILEGED_BOOT_PORTS.items():
        name = f"STREAMBOOT_{field.upper()}"
        value = os.environ.get(name)
        if value is not None and value != str(port):
            lines.append(
                f"warning: {name}={value} replaces the PXE port {port}: PXE firmware asks "
                f"only on {port}, so clients boot only if something forwards {port} to {value}"
            )
        elif value is None and os.geteuid() != 0:
            lines.append(
                f"warning: not root, so {name} keeps its unprivileged default instead of "
                f"{port}: PXE firmware asks only on {port} (run `up` as root for PXE)"
            )
    return lines


def boot_environment(
    interface: str | None, dhcp: DhcpMode, dhcp_range: str | None, public_host: str | None
) -> dict[str, str]:
    """The settings the boot flags stand for, as environment variables (so that `up` and
    every service it starts see the same values). Explicit STREAMBOOT_* variables win."""
    env: dict[str, str] = {"STREAMBOOT_DHCP_MODE": dhcp.value}
    if interface:
        address = interface_address(interface)
        env["STREAMBOOT_DHCP_INTERFACE"] = interface
        # Services answer clients on the boot network; NATS and PostgreSQL stay on loopback.
        env["STREAMBOOT_BIND_HOST"] = address
        env["STREAMBOOT_PUBLIC_HOST"] = address
    if public_host:
        env["STREAMBOOT_PUBLIC_HOST"] = public_host
    if dhcp is DhcpMode.full:
        if not dhcp_range or "," not in dhcp_range:
            raise typer.BadParameter(
                "full DHCP needs an address pool: --dhcp-range START,END", param_hint="--dhcp-range"
            )
        start, end = (part.strip() for part in dhcp_range.split(",", 1))
        for address in (start, end):
            try:
                socket.inet_aton(address)
            except OSError:
                raise typer.BadParameter(
                    f"{address!r} is not an IPv4 address", param_hint="--dhcp-range"
                ) from None
        if interface:
            network = interface_network(interface)
            outside = [a for a in (start, end) if ipaddress.IPv4Address(a) not in network]
            if outside:
                raise typer.BadParameter(
                    f"{', '.join(outside)} is outside {interface}'s network {network}: its "
                    "clients could not reach the server",
                    param_hint="--dhcp-range",
                )
        env["STREAMBOOT_DHCP_POOL_START"] = start
        env["STREAMBOOT_DHCP_POOL_END"] = end
    if dhcp is not DhcpMode.off and os.geteuid() == 0:
        for field, port in PRIVILEGED_BOOT_PORTS.items():
            env[f"STREAMBOOT_{field.upper()}"] = str(port)
    return {k: v for k, v in env.items() if k not in os.environ}


def up(
    data_dir: DataDirOption,
    services: Annotated[
        str,
        typer.Option(
            help="comma-separated services to start ('' for none)",
            envvar="STREAMBOOT_SERVICES",
        ),
    ] = ",".join(SERVICES),
    boot_interface: Annotated[
        str | None,
        typer.Option(help="network interface the PXE clients are on (DHCP binds to it)"),
    ] = None,
    dhcp: Annotated[
        DhcpMode,
        typer.Option(
            help="full: DHCP server with a pool; proxy: beside your DHCP server; off",
            envvar="STREAMBOOT_DHCP_MODE",
        ),
    ] = DhcpMode.off,
    dhcp_range: Annotated[
        str | None, typer.Option(help="full DHCP's address pool: START,END")
    ] = None,
    public_host: Annotated[
        str | None,
        typer.Option(
            help="the address clients use to reach the services (default: the interface's)"
        ),
    ] = None,
) -> None:
    """Start NATS, PostgreSQL and the services; Ctrl-C or SIGTERM stops everything.

    STREAMBOOT_NATS_URL / STREAMBOOT_DATABASE_URL use external servers instead of embedded
    ones; STREAMBOOT_NATS_LISTEN_HOST=ADDR puts the embedded NATS on that address instead of
    loopback (stream nodes on other hosts); STREAMBOOT_<NAME>_PORT=0 picks free ports. With
    --dhcp proxy|full as root, the boot service takes the PXE ports (67, 69, 4011);
    otherwise its unprivileged defaults.
    """
    os.environ.update(boot_environment(boot_interface, dhcp, dhcp_range, public_host))
    for line in port_warnings(dhcp):
        typer.echo(line, err=True)
    from shared.settings import Settings
    from streamboot.supervisor import run_up

    settings = Settings(data_dir=data_dir)
    names = [n.strip() for n in services.split(",") if n.strip()]
    raise typer.Exit(run_up(settings, names))
