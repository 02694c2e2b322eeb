"""Wake-on-LAN: the magic packet that powers a device on so it PXE-boots.

Six 0xFF bytes, then the MAC sixteen times, in one UDP datagram: to the broadcast address
by default (a switched-off machine has no IP address, its NIC only listens for its MAC),
out of the boot interface when there is one, so the packet reaches the clients' network
and not the server's default route.
"""

from __future__ import annotations

import socket

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def magic_packet(mac: str) -> bytes:
    """The packet for a MAC in normal form (``aa:bb:cc:dd:ee:ff``)."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC: {mac!r}")
    return b"\xff" * 6 + raw * 16


def send_magic_packet(mac: str, address: str, port: int, interface: str | None = None) -> str:
    """Send it; returns where it went (``address:port[ via interface]``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        sock.sendto(magic_packet(mac), (address, port))
    return f"{address}:{port}" + (f" via {interface}" if interface else "")
