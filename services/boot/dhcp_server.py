"""DHCP for PXE: proxyDHCP beside an existing DHCP server, or full DHCP with a pool.

:class:`DhcpResponder` decides (packet in, reply out, no sockets) so the policy is testable
with recorded packets; :class:`DhcpServer` moves datagrams. In proxy mode only PXE clients
are answered, with no address: on the DHCP port (the broadcast DISCOVER) and on the PXE
port 4011 (the unicast REQUEST that follows). In full mode every client gets an address
from the pool; PXE clients also get their boot file.

Anyone on the link can send DHCP packets with any MAC, so what one packet costs is bounded:
an OFFER writes nothing, a lease is written before its ACK is sent and writes are batched
(:class:`DhcpServer`), the log has a budget per interval (:mod:`log_budget`), and the boot
announcements that PXE DISCOVERs start (a registry lookup and an event each) have a rate.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from services.boot import dhcp_packets as dp
from services.boot.client_addresses import ClientAddresses
from services.boot.dhcp_leases import FileLeases, LeaseStore, LeaseWriter, PoolExhausted
from services.boot.rate_limit import TokenBucket
from shared.log_budget import LogBudget

log = logging.getLogger("streamboot.boot.dhcp")

# PXE vendor options (option 43): PXE_DISCOVERY_CONTROL (6) = 8, "boot the file named in
# this offer, no boot server discovery" (PXE 2.1 spec), then END.
PXE_VENDOR_OPTIONS = bytes((6, 1, 8, 255))


@dataclass(frozen=True)
class DhcpConfig:
    mode: Literal["proxy", "full"]
    server_ip: str  # option 54 and the next-server (TFTP) address
    ipxe_script_url: str  # what a client that is already iPXE gets instead of a file
    bios_file: str = "undionly.kpxe"
    efi64_file: str = "ipxe.efi"
    pool_start: str | None = None
    pool_end: str | None = None
    subnet_mask: str = "255.255.255.0"
    router: str | None = None
    dns: tuple[str, ...] = ()
    lease_s: int = 3600
    # BootRequested announcements (a registry lookup and an event in the log each) per
    # second, in bursts of 5 s worth; beyond, a PXE DISCOVER is answered but not announced.
    announce_per_s: float = 20.0


@dataclass(frozen=True)
class PxeClient:
    """Who asked to boot: what BootRequested carries."""

    mac: str
    arch: int | None
    uuid: str | None
    ipxe: bool


def boot_file(packet: dp.DhcpPacket, config: DhcpConfig) -> str | None:
    """RFC 4578: the architecture (option 93) picks the iPXE build; iPXE gets its script."""
    if dp.is_ipxe(packet):
        return config.ipxe_script_url
    arch = dp.client_arch(packet)
    if arch in (None, dp.ARCH_BIOS):
        return config.bios_file
    if arch in (dp.ARCH_EFI_BC, dp.ARCH_EFI_X64):
        return config.efi64_file
    return None  # 32-bit EFI, ARM, HTTP boot...: no iPXE build configured for them


@dataclass
class DhcpResponder:
    config: DhcpConfig
    leases: LeaseStore | None = None
    on_pxe_discover: Callable[[PxeClient], None] = lambda client: None
    # Where the addresses seen go, so TFTP transfers can be traced to a MAC.
    addresses: ClientAddresses | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "received": 0, "replied": 0, "malformed": 0, "pxe_discovers": 0,
            "not_announced": 0, "declines_refused": 0, "lease_writes": 0,
            "lease_conflicts": 0,
        }
    )  # fmt: skip
    log_budget: LogBudget = field(default_factory=lambda: LogBudget(log, "dhcp"))

    def __post_init__(self) -> None:
        rate = self.config.announce_per_s
        self._announce = TokenBucket(rate, max(1.0, 5 * rate))

    def handle(
        self, packet: dp.DhcpPacket, *, pxe_port: bool = False, now: float | None = None
    ) -> dp.DhcpPacket | None:
        now = time.time() if now is None else now
        kind = packet.message_type
        if packet.op != dp.BOOTREQUEST or kind is None:
            return None
        pxe = dp.is_pxe(packet)
        if pxe and kind == dp.DISCOVER:
            self.stats["pxe_discovers"] += 1
            if self._announce.allow():
                # First, before any reply: the cache starts warming on this event.
                self.on_pxe_discover(
                    PxeClient(
                        packet.mac, dp.client_arch(packet), dp.client_uuid(packet),
                        dp.is_ipxe(packet),
                    )
                )  # fmt: skip
            else:
                self.stats["not_announced"] += 1
                self.log_budget.log(
                    logging.WARNING, "not announced: over the rate", packet.mac,
                    "dhcp: PXE DISCOVER from %s not announced: more than %g boots a second",
                    packet.mac, self.config.announce_per_s,
                )  # fmt: skip
        if self.config.mode == "proxy" or pxe_port:
            reply = self._proxy(packet, kind, pxe, pxe_port)
        else:
            reply = self._full(packet, kind, pxe, now)
        if self.addresses is not None:
            mac = packet.mac
            self.addresses.note(packet.ciaddr, mac)
            if reply is None or reply.message_type != dp.NAK:  # a NAK'd address is not its own
                self.addresses.note(dp.requested_ip(packet), mac)
            if reply is not None:
                self.addresses.note(reply.yiaddr, mac)
        return reply

    # -- proxyDHCP -----------------------------------------------------------------------

    def _proxy(
        self, packet: dp.DhcpPacket, kind: int, pxe: bool, pxe_port: bool
    ) -> dp.DhcpPacket | None:
        if not pxe:
            return None  # the site's DHCP server answers everyone else
        if kind == dp.DISCOVER and not pxe_port:
            return self._pxe_reply(packet, dp.OFFER)
        if kind in (dp.REQUEST, dp.INFORM) and pxe_port:
            # The PXE client's unicast REQUEST to port 4011 (never one on port 67: that
            # REQUEST is for the site's DHCP server's address offer).
            return self._pxe_reply(packet, dp.ACK)
        return None

    def _pxe_reply(self, packet: dp.DhcpPacket, kind: int) -> dp.DhcpPacket | None:
        reply = self._reply(packet, kind)
        if not self._add_boot(packet, reply):
            return None
        return reply

    # -- full DHCP -----------------------------------------------------------------------

    def _full(
        self, packet: dp.DhcpPacket, kind: int, pxe: bool, now: float
    ) -> dp.DhcpPacket | None:
        assert self.leases is not None, "full DHCP needs a lease store"
        mac, cfg = packet.mac, self.config
        if kind == dp.DISCOVER:
            try:
                lease = self.leases.offer(mac, dp.requested_ip(packet), now)
            except PoolExhausted as exc:
                self.log_budget.log(
                    logging.ERROR, "no address to offer", mac,
                    "dhcp: cannot offer %s an address: %s", mac, exc,
                )  # fmt: skip
                return None
            reply = self._reply(packet, dp.OFFER, lease.ip)
        elif kind == dp.REQUEST:
            chosen = dp.server_id(packet)
            if chosen is not None and chosen != cfg.server_ip:
                return None  # the client took another server's offer
            wanted = dp.requested_ip(packet) or packet.ciaddr
            hostname = packet.options.get(dp.OPT_HOSTNAME, b"").decode("ascii", "replace") or None
            bound = self.leases.bind(mac, wanted, cfg.lease_s, now, hostname)
            if bound is None:
                return self.nak(packet, f"{wanted} is not yours")
            reply = self._reply(packet, dp.ACK, bound.ip)
        elif kind == dp.RELEASE:
            self.leases.release(mac, now)
            return None
        elif kind == dp.DECLINE:
            if (ip := dp.requested_ip(packet)) is None:
                return None
            if self.leases.decline(mac, ip, now):
                self.log_budget.log(
                    logging.WARNING, "declined", mac,
                    "dhcp: %s declined %s (in use on the network?)", mac, ip,
                )  # fmt: skip
            else:
                self.stats["declines_refused"] += 1
                self.log_budget.log(
                    logging.WARNING, "DECLINE refused: not the holder", mac,
                    "dhcp: ignoring a DECLINE of %s from %s: not offered or bound to it", ip, mac,
                )  # fmt: skip
            return None
        elif kind == dp.INFORM:
            reply = self._reply(packet, dp.ACK)
        else:
            return None
        if kind != dp.INFORM:
            reply.options[dp.OPT_LEASE_TIME] = struct.pack("!I", cfg.lease_s)
            reply.options[dp.OPT_RENEWAL_TIME] = struct.pack("!I", cfg.lease_s // 2)
            reply.options[dp.OPT_REBINDING_TIME] = struct.pack("!I", cfg.lease_s * 7 // 8)
        reply.options[dp.OPT_SUBNET_MASK] = dp.ip_bytes(cfg.subnet_mask)
        if cfg.router:
            reply.options[dp.OPT_ROUTER] = dp.ip_bytes(cfg.router)
        if cfg.dns:
            reply.options[dp.OPT_DNS] = dp.ip_bytes(*cfg.dns)
        if pxe:
            self._add_boot(packet, reply)
        return reply

    # -- common --------------------------------------------------------------------------

    def nak(self, packet: dp.DhcpPacket, why: str) -> dp.DhcpPacket:
        nak = self._reply(packet, dp.NAK)
        nak.options = {
            dp.OPT_MESSAGE_TYPE: bytes((dp.NAK,)),
            dp.OPT_SERVER_ID: dp.ip_bytes(self.config.server_ip),
            dp.OPT_MESSAGE: why.encode(),
        }
        return nak

    def _reply(self, packet: dp.DhcpPacket, kind: int, yiaddr: str = "0.0.0.0") -> dp.DhcpPacket:
        return dp.DhcpPacket(
            op=dp.BOOTREPLY, xid=packet.xid, chaddr=packet.chaddr, htype=packet.htype,
            flags=packet.flags, ciaddr=packet.ciaddr, yiaddr=yiaddr, giaddr=packet.giaddr,
            options={
                dp.OPT_MESSAGE_TYPE: bytes((kind,)),
                dp.OPT_SERVER_ID: dp.ip_bytes(self.config.server_ip),
            },
        )  # fmt: skip

    def _add_boot(self, packet: dp.DhcpPacket, reply: dp.DhcpPacket) -> bool:
        name = boot_file(packet, self.config)
        if name is None:
            self.log_budget.log(
                logging.WARNING, "no boot file for the architecture", packet.mac,
                "dhcp: no boot file for %s (architecture %s)", packet.mac, dp.client_arch(packet),
            )  # fmt: skip
            return False
        reply.siaddr = self.config.server_ip
        reply.file = name.encode()[:127]
        reply.options[dp.OPT_VENDOR_CLASS] = b"PXEClient"
        # With PXEClient and no discovery control, UEFI firmware (OVMF) goes looking for a
        # boot server on port 4011 instead of loading the file named here.
        reply.options[dp.OPT_VENDOR_SPECIFIC] = PXE_VENDOR_OPTIONS
        reply.options[dp.OPT_TFTP_SERVER] = self.config.server_ip.encode()
        reply.options[dp.OPT_BOOTFILE] = name.encode()
        return True


def reply_address(
    request: dp.DhcpPacket, source: tuple[str, int], *, server_port: int, client_port: int
) -> tuple[str, int]:
    """Where a reply goes (RFC 2131 4.1): the relay, else the sender when it has an
    address (a renewing client, a test on loopback), else a broadcast on the client port."""
    if request.giaddr != "0.0.0.0":
        return request.giaddr, server_port
    if source[0] != "0.0.0.0":
        return source
    return "255.255.255.255", client_port


def open_socket(host: str, port: int, interface: str | None) -> socket.socket:
    """A DHCP socket; on an interface it listens on 0.0.0.0 (where broadcasts arrive),
    limited to that interface with SO_BINDTODEVICE, and may send broadcasts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if interface:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        host = "0.0.0.0"
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def interface_address(interface: str) -> str:
    """The IPv4 address of an interface (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("256s", interface.encode()[:15])
        res = fcntl.ioctl(sock.fileno(), 0x8915, req)  # SIOCGIFADDR
    return socket.inet_ntoa(res[20:24])


class DhcpServer:
    """Serves a responder on one or two sockets (the DHCP port, and 4011 for proxy mode).

    Lease changes are kept by one task, a group commit: it hands the store's changes to
    its writer (the lease file, or the store shared by several servers) and the ACKs that
    wait for them, then sends those ACKs. What changes during a commit waits for the next
    one, so an ACK always leaves after the commit that holds its lease: a crash loses only
    leases no client was told about (their REQUEST is sent again), never one a client
    uses. A change that another server's record refused turns its ACK into a NAK.
    """

    def __init__(
        self,
        responder: DhcpResponder,
        *,
        server_port: int,
        client_port: int,
        writer: LeaseWriter | None = None,
    ) -> None:
        self.responder = responder
        self.server_port, self.client_port = server_port, client_port
        leases = responder.leases
        self.writer = writer or (FileLeases(leases) if leases is not None else None)
        self._transports: list[asyncio.DatagramTransport] = []
        # ACKs waiting for their lease's commit: where they go, and the REQUEST they answer.
        self._waiting: list[
            tuple[asyncio.DatagramTransport, dp.DhcpPacket, tuple[str, int], dp.DhcpPacket]
        ] = []
        self._writer: asyncio.Task[None] | None = None
        self._last_write = -1e9

    async def start(self, sock: socket.socket, pxe_sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        for s, pxe_port in ((sock, False), (pxe_sock, True)):
            if s is None:
                continue
            transport, _ = await loop.create_datagram_endpoint(
                lambda pxe_port=pxe_port: _Protocol(self, pxe_port), sock=s
            )
            self._transports.append(transport)
            log.info(
                "dhcp: %s mode on %s:%d%s", self.responder.config.mode, *s.getsockname()[:2],
                " (PXE port)" if pxe_port else "",
            )  # fmt: skip

    async def stop(self) -> None:
        for transport in self._transports:
            transport.close()
        if self._writer is not None:
            await self._writer  # what was acknowledged or released is kept
        self.responder.log_budget.flush()

    def on_datagram(
        self,
        transport: asyncio.DatagramTransport,
        data: bytes,
        source: tuple[str, int],
        pxe_port: bool,
    ) -> None:
        stats, budget = self.responder.stats, self.responder.log_budget
        stats["received"] += 1
        try:
            packet = dp.parse(data)
        except dp.DhcpParseError as exc:
            stats["malformed"] += 1
            budget.log(
                logging.WARNING, "malformed", source[0],
                "dhcp: malformed packet from %s:%d: %s", *source, exc,
            )  # fmt: skip
            return
        try:
            reply = self.responder.handle(packet, pxe_port=pxe_port)
        except Exception:  # one bad packet must not stop DHCP for everyone
            log.exception("dhcp: failed to answer %s from %s", packet.mac, source)
            return
        leases = self.responder.leases
        if reply is None:
            if leases is not None and leases.dirty:
                self._write_soon()  # a RELEASE or DECLINE: nobody waits for it
            return
        dest = reply_address(
            packet, source, server_port=self.server_port, client_port=self.client_port
        )
        stats["replied"] += 1
        budget.log(
            logging.INFO, dp.MESSAGE_NAMES.get(reply.message_type or 0, "?"), packet.mac,
            "dhcp: %s %s -> %s %s file=%s to %s:%d",
            dp.MESSAGE_NAMES.get(packet.message_type or 0, "?"), packet.mac,
            dp.MESSAGE_NAMES.get(reply.message_type or 0, "?"), reply.yiaddr,
            reply.file.decode() or "-", *dest,
        )  # fmt: skip
        if leases is not None and leases.dirty:
            self._write_soon()
            if reply.message_type == dp.ACK:  # it tells of a lease: sent once that is kept
                self._waiting.append((transport, reply, dest, packet))
                return
        # Sent on the next turn of the loop, after the task the BootRequested callback may
        # have started (FIFO): the boot's announcement is under way before the client hears back.
        asyncio.get_running_loop().call_soon(transport.sendto, dp.build(reply), dest)

    def _write_soon(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_leases())

    async def _write_leases(self) -> None:
        writer = self.writer
        assert writer is not None
        leases = writer.store
        loop = asyncio.get_running_loop()
        while leases.dirty:
            if (pause := self._last_write + writer.interval_s - loop.time()) > 0:
                await asyncio.sleep(pause)  # gathers what arrives meanwhile into this commit
            batch, self._waiting = self._waiting, []
            try:
                refused = await writer.commit()
            except Exception as exc:  # the file or the bus: the clients ask again
                log.error(
                    "dhcp: cannot keep the leases in %s (%s): %d ACKs not sent, their "
                    "clients will ask again", writer.where, exc, len(batch),
                )  # fmt: skip
                return
            finally:
                self._last_write = loop.time()
            self.responder.stats["lease_writes"] += 1
            for transport, reply, dest, request in batch:
                if reply.yiaddr in refused:
                    self.responder.stats["lease_conflicts"] += 1
                    reply = self.responder.nak(request, f"{reply.yiaddr} was taken meanwhile")
                transport.sendto(dp.build(reply), dest)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpServer, pxe_port: bool) -> None:
        self.server, self.pxe_port = server, pxe_port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.server.on_datagram(self.transport, data, addr, self.pxe_port)

    def error_received(self, exc: Exception) -> None:
        log.debug("dhcp socket: %s", exc)
