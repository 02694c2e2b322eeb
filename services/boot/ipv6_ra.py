"""Answer IPv6 router solicitations on the boot network with "nothing to configure".

iPXE configures IPv4 (DHCP) and IPv6 (router solicitation) side by side and waits for both;
on a network with no IPv6 router its solicitations go unanswered and every boot waits
~13 s for them to time out. A router advertisement with no M/O flags ends that wait at once
(iPXE's ipv6conf_rx_router_advertisement); with a router lifetime of 0 and no prefix it
makes nobody use us as a router and gives nobody an address, so it is harmless to other
hosts. On by default in full-DHCP mode (we own the boot network), off in proxy mode, where
a real IPv6 router may exist.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

log = logging.getLogger("streamboot.boot.ra")

ICMPV6_ROUTER_SOLICITATION = 133
ICMPV6_ROUTER_ADVERTISEMENT = 134
ALL_ROUTERS = "ff02::2"
ALL_NODES = "ff02::1"
# Type, code, checksum (the kernel fills it), hop limit, flags (no M/O), router lifetime 0,
# reachable time, retransmission timer: RFC 4861 section 4.2, with no options.
ROUTER_ADVERTISEMENT = struct.pack("!BBHBBHII", ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0)


def open_ra_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    index = socket.if_nametoindex(interface)
    # NDP messages must carry hop limit 255 (receivers drop others).
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    group = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
    sock.setblocking(False)
    return sock


async def answer_solicitations(interface: str) -> None:
    """Run until cancelled: every router solicitation gets the empty advertisement."""
    sock = open_ra_socket(interface)
    index = socket.if_nametoindex(interface)
    loop = asyncio.get_running_loop()

    def on_readable() -> None:
        # add_reader + non-blocking recvfrom: uvloop has no sock_recvfrom for raw sockets.
        while True:
            try:
                data, _ = sock.recvfrom(1500)
            except BlockingIOError:
                return
            if data and data[0] == ICMPV6_ROUTER_SOLICITATION:
                try:
                    sock.sendto(ROUTER_ADVERTISEMENT, (ALL_NODES, 0, 0, index))
                except OSError as exc:
                    log.warning("router advertisement on %s not sent: %s", interface, exc)

    loop.add_reader(sock.fileno(), on_readable)
    log.info("answering IPv6 router solicitations on %s (nothing to configure)", interface)
    try:
        await asyncio.Event().wait()
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
