"""DHCP: the recorded bytes of busybox udhcpc, the responder's decisions, crafted bad
packets on loopback, and the real udhcpc over a veth pair between two network namespaces
(real broadcast on ports 67/68, the server bound to its interface)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.boot import dhcp_packets as dp
from services.boot.dhcp_leases import LeaseStore
from services.boot.dhcp_server import (
    DhcpConfig,
    DhcpResponder,
    DhcpServer,
    PxeClient,
    open_socket,
)
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
    responder = DhcpResponder(cfg, LeaseStore(path, cfg.pool_start, cfg.pool_end))  # type: ignore[arg-type]
    offer = responder.handle(dp.parse(PXE_DISCOVER), now=1000)
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


def test_pool_exhaustion_and_decline(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.json", "10.213.0.100", "10.213.0.101")
    cfg = full_config()
    responder = DhcpResponder(cfg, store)
    macs = ["525400000001", "525400000002", "525400000003"]
    replies = []
    for mac in macs:
        packet = dp.parse(PLAIN_DISCOVER)
        packet.chaddr = bytes.fromhex(mac)
        replies.append(responder.handle(packet, now=0))
    assert [r.yiaddr if r else None for r in replies] == ["10.213.0.100", "10.213.0.101", None]
    # An offer expires: the third client gets the first address later on.
    packet = dp.parse(PLAIN_DISCOVER)
    packet.chaddr = bytes.fromhex(macs[2])
    late = responder.handle(packet, now=3600)
    assert late is not None
    # A declined address stays out of the pool for a while.
    decline = with_options(PLAIN_DISCOVER, o53=bytes((dp.DECLINE,)), o50=dp.ip_bytes(late.yiaddr))
    decline.chaddr = packet.chaddr
    assert responder.handle(decline, now=3601) is None
    retry = responder.handle(packet, now=3602)
    assert retry is not None and retry.yiaddr != late.yiaddr


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
