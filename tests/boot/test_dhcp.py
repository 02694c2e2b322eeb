"""DHCP: the recorded bytes of busybox udhcpc, the responder's decisions, crafted bad
packets on loopback, and the real udhcpc over a veth pair between two network namespaces
(real broadcast on ports 67/68, the server bound to its interface)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.boot import dhcp_packets as dp
from services.boot.dhcp_leases import LeaseStore, PoolExhausted, write_leases
from services.boot.dhcp_server import (
    DhcpConfig,
    DhcpResponder,
    DhcpServer,
    PxeClient,
    open_socket,
)
from shared.contracts.boot import read_leases
from tests.boot.netns import Link, client_socket, veth_link

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"
PXE_DISCOVER = (FIXTURES / "udhcpc_pxe_discover.bin").read_bytes()
PLAIN_DISCOVER = (FIXTURES / "udhcpc_plain_discover.bin").read_bytes()
SCRIPT_URL = "http://10.213.0.1:18082/ipxe/boot.ipxe"
PROXY = DhcpConfig(mode="proxy", server_ip="10.213.0.1", ipxe_script_url=SCRIPT_URL)


def full_config() -> DhcpConfig:
    return replace(
        PROXY, mode="full", pool_start="10.213.0.100", pool_end="10.213.0.102",
        router="10.213.0.1", dns=("10.213.0.53",), lease_s=600,
    )  # fmt: skip


def with_options(raw: bytes, **changes: bytes | None) -> dp.DhcpPacket:
    packet = dp.parse(raw)
    for key, value in changes.items():
        code = int(key.removeprefix("o"))
        if value is None:
            packet.options.pop(code, None)
        else:
            packet.options[code] = value
    return packet


# --- recorded bytes ---------------------------------------------------------------------


def test_recorded_udhcpc_discover() -> None:
    packet = dp.parse(PXE_DISCOVER)
    assert packet.message_type == dp.DISCOVER and packet.op == dp.BOOTREQUEST
    assert packet.mac == "52:54:00:12:34:56"
    assert dp.is_pxe(packet) and not dp.is_ipxe(packet)
    assert dp.client_arch(packet) == dp.ARCH_EFI_BC
    assert dp.client_uuid(packet) == "d4c3b2a1-f6e5-1807-293a-4b5c6d7e8f90"
    assert dp.build(packet) == PXE_DISCOVER  # round trip, byte for byte
    plain = dp.parse(PLAIN_DISCOVER)
    assert not dp.is_pxe(plain) and dp.client_arch(plain) is None
    assert plain.options[dp.OPT_VENDOR_CLASS].startswith(b"udhcp")
    assert dp.build(plain) == PLAIN_DISCOVER


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01" * 100,
        PXE_DISCOVER[:239],  # header without the magic cookie
        PXE_DISCOVER[:236] + b"\x00\x00\x00\x00" + PXE_DISCOVER[240:],  # wrong cookie
        PXE_DISCOVER[:2] + b"\x00" + PXE_DISCOVER[3:],  # hlen 0
        PXE_DISCOVER[:2] + b"\x11" + PXE_DISCOVER[3:],  # hlen 17
        b"\x07" + PXE_DISCOVER[1:],  # bad op
        PXE_DISCOVER[:240] + b"\x35\x05\x01",  # option overruns
        PXE_DISCOVER[:240] + b"\x35",  # option length missing
    ],
)
def test_malformed_packets_raise_parse_errors(data: bytes) -> None:
    with pytest.raises(dp.DhcpParseError):
        dp.parse(data)


def test_truncated_and_mangled_packets_never_crash_the_parser() -> None:
    rng = random.Random(4578)
    for _ in range(2000):
        data = bytearray(PXE_DISCOVER[: rng.randrange(len(PXE_DISCOVER) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            packet = dp.parse(bytes(data))
        except dp.DhcpParseError:
            continue
        DhcpResponder(PROXY).handle(packet)  # whatever it says, it must not raise


# --- decisions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [(b"\x00\x00", "undionly.kpxe"), (b"\x00\x07", "ipxe.efi"), (b"\x00\x09", "ipxe.efi"),
     (None, "undionly.kpxe")],
)  # fmt: skip
def test_proxy_offer_boot_file_by_architecture(arch: bytes | None, expected: str) -> None:
    seen: list[PxeClient] = []
    responder = DhcpResponder(PROXY, on_pxe_discover=seen.append)
    reply = responder.handle(with_options(PXE_DISCOVER, o93=arch))
    assert reply is not None and reply.message_type == dp.OFFER
    assert reply.yiaddr == "0.0.0.0"  # proxyDHCP never hands out addresses
    assert reply.file == expected.encode() and reply.siaddr == "10.213.0.1"
    assert reply.options[dp.OPT_VENDOR_CLASS] == b"PXEClient"
    assert reply.options[dp.OPT_SERVER_ID] == dp.ip_bytes("10.213.0.1")
    assert reply.options[dp.OPT_VENDOR_SPECIFIC] == bytes((6, 1, 8, 255))
    assert reply.xid == dp.parse(PXE_DISCOVER).xid
    assert seen == [
        PxeClient("52:54:00:12:34:56", dp.client_arch(with_options(PXE_DISCOVER, o93=arch)),
                  "d4c3b2a1-f6e5-1807-293a-4b5c6d7e8f90", False)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "ipxe_marker",
    [{"o175": b"\xb1\x05\x01\x02\x03\x04\x05"}, {"o77": b"iPXE"}, {"o77": b"\x04iPXE"}],
)
def test_ipxe_client_gets_the_script_url(ipxe_marker: dict[str, bytes]) -> None:
    reply = DhcpResponder(PROXY).handle(with_options(PXE_DISCOVER, **ipxe_marker))
    assert reply is not None and reply.file == SCRIPT_URL.encode()


def test_proxy_ignores_non_pxe_and_unsupported_clients() -> None:
    seen: list[PxeClient] = []
    responder = DhcpResponder(PROXY, on_pxe_discover=seen.append)
    assert responder.handle(dp.parse(PLAIN_DISCOVER)) is None
    assert seen == []
    # 32-bit EFI: announced (the boot was requested) but no file to give.
    assert responder.handle(with_options(PXE_DISCOVER, o93=b"\x00\x06")) is None
    assert len(seen) == 1


def test_proxy_answers_the_pxe_request_on_port_4011_only() -> None:
    responder = DhcpResponder(PROXY)
    request = with_options(PXE_DISCOVER, o53=bytes((dp.REQUEST,)))
    assert responder.handle(request) is None
    reply = responder.handle(request, pxe_port=True)
    assert reply is not None and reply.message_type == dp.ACK and reply.file == b"ipxe.efi"


def test_a_full_dhcp_offer_tells_pxe_firmware_to_load_the_file_directly(tmp_path: Path) -> None:
    # Without option 43's discovery control, OVMF's PXE looked for a boot server on port
    # 4011 and gave up: "PXE-E16: No valid offer received".
    cfg = full_config()
    responder = DhcpResponder(cfg, LeaseStore(tmp_path / "l.json", cfg.pool_start, cfg.pool_end))  # type: ignore[arg-type]
    offer = responder.handle(dp.parse(PXE_DISCOVER), now=1000)
    assert offer is not None and offer.file == b"ipxe.efi"
    assert offer.options[dp.OPT_VENDOR_CLASS] == b"PXEClient"
    assert offer.options[dp.OPT_VENDOR_SPECIFIC] == bytes((6, 1, 8, 255))


def test_full_dhcp_lease_cycle_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    cfg = full_config()
    store = LeaseStore(path, cfg.pool_start, cfg.pool_end)  # type: ignore[arg-type]
    responder = DhcpResponder(cfg, store)
    offer = responder.handle(dp.parse(PXE_DISCOVER), now=1000)
    assert not store.dirty  # an offer is never written
    assert offer is not None and offer.message_type == dp.OFFER and offer.yiaddr == "10.213.0.100"
    assert offer.file == b"ipxe.efi"
    assert offer.options[dp.OPT_ROUTER] == dp.ip_bytes("10.213.0.1")
    assert offer.options[dp.OPT_LEASE_TIME] == (600).to_bytes(4, "big")
    request = with_options(
        PXE_DISCOVER, o53=bytes((dp.REQUEST,)), o50=dp.ip_bytes("10.213.0.100"),
        o54=dp.ip_bytes("10.213.0.1"), o12=b"lab-001",
    )  # fmt: skip
    ack = responder.handle(request, now=1001)
    assert ack is not None and ack.message_type == dp.ACK and ack.yiaddr == "10.213.0.100"
    assert store.dirty  # the server writes the file before it sends the ACK
    write_leases(path, store.snapshot())

    # A restart reads the same leases back.
    store = LeaseStore(path, "10.213.0.100", "10.213.0.102")
    [lease] = store.leases()
    assert (lease.mac, lease.ip, lease.state, lease.hostname) == (
        "52:54:00:12:34:56", "10.213.0.100", "bound", "lab-001",
    )  # fmt: skip
    responder = DhcpResponder(cfg, store)

    # Another client gets another address; asking for the first one's address is refused.
    other = dp.parse(PLAIN_DISCOVER)
    other.chaddr = bytes.fromhex("525400aaaaaa")
    offer2 = responder.handle(other, now=1002)
    assert offer2 is not None and offer2.yiaddr == "10.213.0.101" and offer2.file == b""
    steal = with_options(PLAIN_DISCOVER, o53=bytes((dp.REQUEST,)), o50=dp.ip_bytes("10.213.0.100"))
    steal.chaddr = other.chaddr
    nak = responder.handle(steal, now=1003)
    assert nak is not None and nak.message_type == dp.NAK

    # A request for another server's offer is not ours to answer.
    elsewhere = with_options(PXE_DISCOVER, o53=bytes((dp.REQUEST,)), o54=dp.ip_bytes("10.9.9.9"))
    assert responder.handle(elsewhere, now=1004) is None

    # Release keeps the address for the same client next time.
    responder.handle(with_options(PXE_DISCOVER, o53=bytes((dp.RELEASE,))), now=1005)
    again = responder.handle(dp.parse(PXE_DISCOVER), now=1006)
    assert again is not None and again.yiaddr == "10.213.0.100"


def discover_from(mac: str) -> dp.DhcpPacket:
    packet = dp.parse(PLAIN_DISCOVER)
    packet.chaddr = bytes.fromhex(mac)
    return packet


def message_from(mac: str, kind: int, ip: str) -> dp.DhcpPacket:
    packet = with_options(PLAIN_DISCOVER, o53=bytes((kind,)), o50=dp.ip_bytes(ip))
    packet.chaddr = bytes.fromhex(mac)
    return packet


def test_offers_do_not_exhaust_the_pool_and_bound_leases_do(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.json", "10.213.0.100", "10.213.0.101")
    responder = DhcpResponder(full_config(), store)
    first, second, third = "525400000001", "525400000002", "525400000003"
    offers = [responder.handle(discover_from(mac), now=0) for mac in (first, second)]
    assert [r.yiaddr if r else None for r in offers] == ["10.213.0.100", "10.213.0.101"]
    ack = responder.handle(message_from(first, dp.REQUEST, "10.213.0.100"), now=1)
    assert ack is not None and ack.message_type == dp.ACK
    # No free address left: the third client gets the offer the second has not taken up...
    late = responder.handle(discover_from(third), now=2)
    assert late is not None and late.yiaddr == "10.213.0.101"
    # ... and the same one again when it asks again (one offer per MAC, not one per packet).
    again = responder.handle(discover_from(third), now=3)
    assert again is not None and again.yiaddr == "10.213.0.101"
    # Whoever REQUESTs first gets it: an offer is not a promise.
    ack = responder.handle(message_from(second, dp.REQUEST, "10.213.0.101"), now=4)
    assert ack is not None and ack.message_type == dp.ACK and ack.yiaddr == "10.213.0.101"
    nak = responder.handle(message_from(third, dp.REQUEST, "10.213.0.101"), now=5)
    assert nak is not None and nak.message_type == dp.NAK
    # Every address bound: nothing to offer until a lease expires.
    assert responder.handle(discover_from(third), now=6) is None
    later = responder.handle(discover_from(third), now=3600)
    assert later is not None and later.yiaddr == "10.213.0.100"


def test_decline_only_from_the_client_that_holds_the_address(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.json", "10.213.0.100", "10.213.0.102")
    responder = DhcpResponder(full_config(), store)
    holder, stranger = "525400000001", "5254000000ff"
    offer = responder.handle(discover_from(holder), now=0)
    assert offer is not None and offer.yiaddr == "10.213.0.100"
    # A MAC that was never offered the address: ignored, the address stays in the pool.
    for ip in ("10.213.0.100", "10.213.0.101"):
        assert responder.handle(message_from(stranger, dp.DECLINE, ip), now=1) is None
    assert responder.stats["declines_refused"] == 2 and not store.dirty
    other = responder.handle(discover_from("525400000002"), now=2)
    assert other is not None and other.yiaddr == "10.213.0.101"
    # The holder's DECLINE keeps the address out of the pool for a while.
    assert responder.handle(message_from(holder, dp.DECLINE, "10.213.0.100"), now=3) is None
    assert store.dirty
    retry = responder.handle(discover_from(holder), now=4)
    assert retry is not None and retry.yiaddr == "10.213.0.102"


def test_lease_store_keeps_its_promises_under_random_traffic(tmp_path: Path) -> None:
    # The store's heaps against the rules, checked after every step of random traffic.
    store = LeaseStore(tmp_path / "l.json", "10.213.0.1", "10.213.0.16")
    rng, now = random.Random(2132), 0.0
    macs = [f"02:00:00:00:00:{n:02x}" for n in range(40)]
    for _ in range(5000):
        now += rng.random() * 4
        mac, op = rng.choice(macs), rng.random()
        bound_before = {x.ip: x.mac for x in store.by_ip.values()
                        if x.state in ("bound", "declined") and x.expires > now}  # fmt: skip
        if op < 0.5:
            free = [ip for ip in store.pool if ip not in store.by_ip]
            own = store.by_mac.get(mac)
            try:
                lease = store.offer(mac, None, now)
            except PoolExhausted:
                assert len(bound_before) == len(store.pool) and own is None
                continue
            assert bound_before.get(lease.ip, mac) == mac  # never someone else's lease
            if free and (own is None or own.state == "declined"):
                assert lease.ip == free[0]  # the first free address, in pool order
        elif op < 0.8:
            ip = rng.choice(store.pool)
            if store.bind(mac, ip, rng.choice((30, 300)), now, None) is not None:
                assert bound_before.get(ip, mac) == mac
            else:
                assert bound_before.get(ip, mac) != mac
        elif op < 0.9:
            store.release(mac, now)
        else:
            ip = rng.choice(store.pool)
            holder = store.by_ip.get(ip)
            assert store.decline(mac, ip, now) == (holder is not None and holder.mac == mac)
        assert all(store.by_ip[x.ip] is x for x in store.by_mac.values())
        assert all(store.by_mac[x.mac] is x for x in store.by_ip.values())


# --- a server on loopback, fed crafted packets ------------------------------------------


@pytest.fixture
async def loopback_server() -> AsyncIterator[tuple[DhcpServer, int, int, list[PxeClient]]]:
    seen: list[PxeClient] = []
    server = DhcpServer(
        DhcpResponder(PROXY, on_pxe_discover=seen.append), server_port=67, client_port=68
    )
    sock, pxe_sock = open_socket("127.0.0.1", 0, None), open_socket("127.0.0.1", 0, None)
    ports = sock.getsockname()[1], pxe_sock.getsockname()[1]
    await server.start(sock, pxe_sock)
    try:
        yield server, *ports, seen
    finally:
        await server.stop()


async def test_server_survives_bad_packets_and_still_answers(loopback_server) -> None:  # type: ignore[no-untyped-def]
    server, port, pxe_port, seen = loopback_server

    def go() -> tuple[dp.DhcpPacket, dp.DhcpPacket]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for junk in (b"", b"\x00" * 10, os.urandom(600), PXE_DISCOVER[:250], PLAIN_DISCOVER):
                sock.sendto(junk, ("127.0.0.1", port))
            sock.sendto(PXE_DISCOVER, ("127.0.0.1", port))
            offer = dp.parse(sock.recv(2048))  # the plain client got nothing: this is ours
            request = with_options(PXE_DISCOVER, o53=bytes((dp.REQUEST,)))
            sock.sendto(dp.build(request), ("127.0.0.1", pxe_port))
            return offer, dp.parse(sock.recv(2048))

    offer, ack = await asyncio.to_thread(go)
    assert offer.message_type == dp.OFFER and offer.file == b"ipxe.efi"
    assert ack.message_type == dp.ACK and ack.file == b"ipxe.efi"
    assert server.responder.stats["malformed"] >= 3
    assert [c.mac for c in seen] == ["52:54:00:12:34:56"]


# --- real udhcpc across a veth pair -----------------------------------------------------


@pytest.fixture
def link() -> AsyncIterator[Link]:
    with veth_link() as link:
        yield link  # type: ignore[misc]


async def start_in_namespace(link: Link, responder: DhcpResponder) -> DhcpServer:
    server = DhcpServer(responder, server_port=67, client_port=68)
    sock = link.in_server_ns(lambda: open_socket("0.0.0.0", 67, link.server_if))
    await server.start(sock)
    return server


async def udhcpc(link: Link, tmp_path: Path, *args: str) -> dict[str, str]:
    """Run the real busybox udhcpc once; returns the environment its script saw at 'bound'."""
    out = tmp_path / "bound.env"
    out.unlink(missing_ok=True)
    script = tmp_path / "udhcpc.script"
    script.write_text('#!/bin/sh\n[ "$1" = bound ] && env > "$UDHCPC_OUT"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    cmd = link.client_cmd(
        "env", f"UDHCPC_OUT={out}", "busybox", "udhcpc", "-i", link.client_if,
        "-f", "-q", "-n", "-t", "4", "-T", "1", "-s", str(script), *args,
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, output.decode()
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


PXE_ARGS = ("-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007")


async def test_real_udhcpc_full_dhcp(link: Link, tmp_path: Path) -> None:
    cfg = full_config()
    seen: list[PxeClient] = []
    leases = LeaseStore(tmp_path / "leases.json", cfg.pool_start, cfg.pool_end)  # type: ignore[arg-type]
    server = await start_in_namespace(link, DhcpResponder(cfg, leases, seen.append))
    try:
        env = await udhcpc(link, tmp_path, *PXE_ARGS)
        assert env["ip"] == "10.213.0.100" and env["subnet"] == "255.255.255.0"
        assert env["router"] == "10.213.0.1" and env["dns"] == "10.213.0.53"
        assert env["boot_file"] == "ipxe.efi" and env["siaddr"] == "10.213.0.1"
        assert env["serverid"] == "10.213.0.1" and env["lease"] == "600"
        assert seen and seen[0].mac == link.client_mac and seen[0].arch == 7
        # Same client as BIOS: same address (sticky lease), the BIOS build.
        env = await udhcpc(
            link, tmp_path, "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"
        )
        assert (env["ip"], env["boot_file"]) == ("10.213.0.100", "undionly.kpxe")
        # Already iPXE (user class): the script URL.
        env = await udhcpc(link, tmp_path, *PXE_ARGS, "-x", "0x4d:69505845")
        assert env["boot_file"] == SCRIPT_URL
        # Not a PXE client at all: an address, no boot file.
        env = await udhcpc(link, tmp_path)
        assert env["ip"] == "10.213.0.100" and "boot_file" not in env
    finally:
        await server.stop()
    [lease] = LeaseStore(tmp_path / "leases.json", cfg.pool_start, cfg.pool_end).leases()  # type: ignore[arg-type]
    assert (lease.mac, lease.ip, lease.state) == (link.client_mac, "10.213.0.100", "bound")


async def test_proxy_offer_is_broadcast_on_the_interface(link: Link) -> None:
    server = await start_in_namespace(link, DhcpResponder(PROXY))
    try:
        sock = link.in_client_ns(client_socket(link))

        def go() -> dp.DhcpPacket:
            sock.settimeout(1)
            with sock:
                for _ in range(5):  # like a real client: resend until answered
                    sock.sendto(PXE_DISCOVER, ("255.255.255.255", 67))  # udhcpc's recorded bytes
                    try:
                        return dp.parse(sock.recv(2048))
                    except TimeoutError:
                        continue
            raise AssertionError("no offer")

        offer = await asyncio.to_thread(go)
    finally:
        await server.stop()
    assert offer.message_type == dp.OFFER and offer.yiaddr == "0.0.0.0"
    assert offer.file == b"ipxe.efi" and offer.mac == link.client_mac


# --- floods: random MACs, forged DECLINEs -----------------------------------------------


def random_discover(rng: random.Random, raw: bytes = PLAIN_DISCOVER) -> bytes:
    packet = dp.parse(raw)
    packet.chaddr = bytes((0x02, *rng.randbytes(5)))  # locally administered, like a forger's
    packet.xid = rng.getrandbits(32)
    return dp.build(packet)


@pytest.fixture
async def full_server(tmp_path: Path) -> AsyncIterator[tuple[DhcpServer, int, list[PxeClient]]]:
    cfg = replace(full_config(), pool_end="10.213.0.149", announce_per_s=1.0)
    seen: list[PxeClient] = []
    leases = LeaseStore(tmp_path / "leases.json", cfg.pool_start, cfg.pool_end)  # type: ignore[arg-type]
    server = DhcpServer(DhcpResponder(cfg, leases, seen.append), server_port=67, client_port=68)
    sock = open_socket("127.0.0.1", 0, None)
    port = sock.getsockname()[1]
    await server.start(sock)
    try:
        yield server, port, seen
    finally:
        await server.stop()


def flood(port: int, packets: list[bytes]) -> int:
    """Send ``packets`` to the server on loopback; how many answers came back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        answers = 0
        for i, packet in enumerate(packets):
            sock.sendto(packet, ("127.0.0.1", port))
            if i % 50 == 49:  # paced like a sender on a link, not beyond the socket buffers
                sock.settimeout(0.2)
                answers += drain(sock)
        sock.settimeout(0.5)
        return answers + drain(sock)


def drain(sock: socket.socket) -> int:
    """Answers until none came for the socket's timeout."""
    n = 0
    while True:
        try:
            sock.recv(2048)
        except TimeoutError:
            return n
        n += 1
        sock.settimeout(0.02)


async def test_a_discover_flood_writes_no_lease_file(
    full_server: tuple[DhcpServer, int, list[PxeClient]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, port, seen = full_server
    caplog.set_level(logging.INFO, logger="streamboot.boot.dhcp")
    path = tmp_path / "leases.json"
    await lease_cycle(port, "52:54:00:00:00:01")  # one real lease: the file exists
    before = path.stat()
    rng = random.Random(2131)
    packets = [random_discover(rng, raw) for raw in (PLAIN_DISCOVER, PXE_DISCOVER) * 1000]
    answers = await asyncio.to_thread(flood, port, packets)
    assert answers > 1000  # a pool of 50: offers were reused, not exhausted
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert server.responder.stats["lease_writes"] == 1
    # A real client still gets its lease in the middle of the flood.
    ack = await lease_cycle(port, "52:54:00:00:00:02")
    assert ack.message_type == dp.ACK
    # 1000 PXE DISCOVERs from random MACs: a bounded number of boot announcements.
    assert len(seen) < 100 and server.responder.stats["not_announced"] >= 1000 - len(seen)
    await server.stop()
    dhcp_lines = [r for r in caplog.records if r.name == "streamboot.boot.dhcp"]
    summaries = [r for r in dhcp_lines if "more lines not logged" in r.getMessage()]
    assert len(dhcp_lines) < 100 and summaries


async def lease_cycle(port: int, mac: str) -> dp.DhcpPacket:
    """DISCOVER, REQUEST the offered address; the answer to the REQUEST."""

    def go() -> dp.DhcpPacket:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            discover = dp.parse(PLAIN_DISCOVER)
            discover.chaddr = bytes.fromhex(mac.replace(":", ""))
            sock.sendto(dp.build(discover), ("127.0.0.1", port))
            offer = next_reply(sock, discover.xid)
            request = message_from(discover.chaddr.hex(), dp.REQUEST, offer.yiaddr)
            request.xid = discover.xid
            request.options[dp.OPT_SERVER_ID] = dp.ip_bytes("10.213.0.1")
            sock.sendto(dp.build(request), ("127.0.0.1", port))
            return next_reply(sock, discover.xid)

    return await asyncio.to_thread(go)


def next_reply(sock: socket.socket, xid: int) -> dp.DhcpPacket:
    while True:
        reply = dp.parse(sock.recv(2048))
        if reply.xid == xid:
            return reply


async def test_an_ack_leaves_only_once_its_lease_is_in_the_file(
    full_server: tuple[DhcpServer, int, list[PxeClient]], tmp_path: Path
) -> None:
    server, port, _ = full_server
    path = tmp_path / "leases.json"
    macs = [f"52:54:00:00:01:{n:02x}" for n in range(40)]

    def go() -> list[tuple[str, dp.DhcpPacket, set[str]]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            offers = {}
            for i, mac in enumerate(macs):
                discover = dp.parse(PLAIN_DISCOVER)
                discover.chaddr, discover.xid = bytes.fromhex(mac.replace(":", "")), i
                sock.sendto(dp.build(discover), ("127.0.0.1", port))
                offers[mac] = next_reply(sock, i)
            for i, mac in enumerate(macs):  # all REQUESTs at once
                request = message_from(mac.replace(":", ""), dp.REQUEST, offers[mac].yiaddr)
                request.xid = i
                sock.sendto(dp.build(request), ("127.0.0.1", port))
            acks = []
            for _ in macs:
                ack = dp.parse(sock.recv(2048))
                in_file = {str(x["mac"]) for x in read_leases(path)}  # right on arrival
                acks.append((macs[ack.xid], ack, in_file))
            return acks

    acks = await asyncio.to_thread(go)
    for mac, ack, in_file in acks:
        assert ack.message_type == dp.ACK and mac in in_file
    # Forty leases, written in a few batches (the first lease alone, the rest together).
    assert 1 <= server.responder.stats["lease_writes"] < len(macs) // 4


async def test_real_udhcpc_gets_an_address_during_a_discover_flood(
    link: Link, tmp_path: Path
) -> None:
    cfg = replace(full_config(), pool_end="10.213.0.119")  # 20 addresses, 2,000 forged MACs
    leases = LeaseStore(tmp_path / "leases.json", cfg.pool_start, cfg.pool_end)  # type: ignore[arg-type]
    responder = DhcpResponder(cfg, leases)
    server = await start_in_namespace(link, responder)
    sender = link.in_client_ns(client_socket(link, port=0))
    done = threading.Event()

    def forge() -> int:
        rng = random.Random(1)
        with sender:
            for i in range(2000):
                sender.sendto(random_discover(rng), ("255.255.255.255", 67))
                if i % 10 == 9:
                    done.wait(0.01)  # spread over a few seconds: udhcpc runs in the middle
        return i + 1

    flooding = asyncio.ensure_future(asyncio.to_thread(forge))
    try:
        for _ in range(200):  # until the forged offers hold every address of the pool
            if len(leases.by_ip) == 20:
                break
            await asyncio.sleep(0.02)
        assert len(leases.by_ip) == 20 and not flooding.done()
        env = await udhcpc(link, tmp_path)
        assert not flooding.done(), "the flood ended before udhcpc had its address"
        assert await flooding == 2000
    finally:
        done.set()
        await server.stop()
    assert env["ip"].startswith("10.213.0.1")
    [lease] = read_leases(tmp_path / "leases.json")
    assert (lease["mac"], lease["ip"], lease["state"]) == (link.client_mac, env["ip"], "bound")
    assert responder.stats["lease_writes"] == 1
