"""The TFTP server under attack, over real UDP: raw sockets hold and flood, while curl,
tftp-hpa and atftp fetch files at the same time (a legitimate client is never locked out).

Attackers send from other loopback addresses (127.0.0.2 and up) than the real clients
(127.0.0.1): the limits are per client address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from pathlib import Path

import pytest

from services.boot.tftp_packets import (
    DATA,
    ERR_UNDEFINED,
    ERROR,
    OACK,
    RRQ,
    build_ack,
    build_error,
    build_request,
    parse_oack,
)
from services.boot.tftp_server import TftpConfig, TftpServer, running
from tests.boot.test_tftp import error_of, raw_socket, run, settled

pytestmark = pytest.mark.timeout(120)


# The attacker runs in its own process (as it would), so its Python loop does not compete
# with the server's transfer threads for this process's GIL.
ATTACKER = """
import select, socket, sys
port, addresses, each, repeat, request = (
    int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]),
    bytes.fromhex(sys.argv[5]),
)
socks = []
for address in addresses:
    for _ in range(each):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.setblocking(False)
        socks.append(sock)
while True:
    for sock in socks:
        for _ in range(repeat):
            sock.sendto(request, ("127.0.0.1", port))
    print("pass", flush=True)
    if select.select([sys.stdin], [], [], 0.05)[0]:
        break
    for sock in socks:  # never acknowledged: read and thrown away
        try:
            while True:
                sock.recv(65536)
        except BlockingIOError:
            pass
"""


class Attack:
    """Read requests from many sockets that never acknowledge, in passes until stopped."""

    def __init__(
        self, port: int, addresses: list[str], sockets_each: int, repeat: int, request: bytes
    ) -> None:
        self.args = [str(port), ",".join(addresses), str(sockets_each), str(repeat), request.hex()]
        self.proc: asyncio.subprocess.Process | None = None

    async def passes(self, n: int) -> None:
        """Wait until the attacker has sent ``n`` more passes."""
        assert self.proc is not None and self.proc.stdout is not None
        for _ in range(n):
            assert await self.proc.stdout.readline() == b"pass\n"

    async def __aenter__(self) -> Attack:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACKER, *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        await asyncio.wait_for(self.proc.communicate(), 30)


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def real_clients_fetch(server: TftpServer, root: Path, tmp_path: Path) -> None:
    """curl, tftp-hpa and atftp each fetch the file, all at once."""
    port = str(server.port)
    await asyncio.gather(
        run("curl", "-sf", "-o", str(tmp_path / "c"), f"tftp://127.0.0.1:{port}/small.bin"),
        run("tftp", "-m", "binary", "127.0.0.1", port, "-c", "get", "small.bin",
            str(tmp_path / "t")),
        run("atftp", "--option", "windowsize 8", "-g", "-r", "small.bin",
            "-l", str(tmp_path / "a"), "127.0.0.1", port),
    )  # fmt: skip
    expected = (root / "small.bin").read_bytes()
    for name in "cta":
        assert (tmp_path / name).read_bytes() == expected, name


LOCKOUT = build_request(RRQ, "small.bin", timeout=255)
SHAPES = {
    "one socket": (["127.0.0.2"], 1, 600),
    "one address": (["127.0.0.2"], 600, 1),
    "many addresses": ([f"127.0.1.{n}" for n in range(1, 151)], 4, 1),
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_real_clients_fetch_during_a_lockout_attack(
    root: Path, tmp_path: Path, shape: str
) -> None:
    # The defaults of a real server: 512 slots, 1 s retransmission, 5 retries.
    async with running(TftpConfig(root=root)) as server:
        async with Attack(server.port, *SHAPES[shape], LOCKOUT) as attack:
            await attack.passes(3)
            if shape == "many addresses":  # enough addresses to take every slot
                await until(lambda: server.stats["reclaimed"] > 0, "the slots all taken")
            await real_clients_fetch(server, root, tmp_path)
            live = len(server.transfers)
            await attack.passes(1)  # the attack went on all along
        assert server.stats["completed"] >= 3
        if shape == "one socket":  # one transfer; the same request again is its resend
            assert live <= 1 + 3 and server.stats["duplicates"] > 0
        elif shape == "one address":  # its share of the slots, the rest refused or dropped
            assert live <= TftpConfig.max_transfers_per_client + 3
            assert server.stats["refused"] + server.stats["dropped"] > 0


async def test_a_timeout_above_the_cap_is_ignored(root: Path) -> None:
    async with running(TftpConfig(root=root, max_client_timeout_s=10)) as server:

        def oack(**options: int) -> dict[str, str]:
            with raw_socket() as sock:
                sock.sendto(build_request(RRQ, "small.bin", **options), ("127.0.0.1", server.port))
                reply, peer = sock.recvfrom(65536)
                sock.sendto(build_error(0, "just looking"), peer)
            assert struct.unpack_from("!H", reply)[0] == OACK
            return parse_oack(reply)

        # RFC 2349: the OACK repeats the client's timeout exactly, or leaves it out.
        assert await asyncio.to_thread(oack, timeout=255, blksize=1024) == {"blksize": "1024"}
        assert await asyncio.to_thread(oack, timeout=11, tsize=0) == {"tsize": "100000"}
        assert await asyncio.to_thread(oack, timeout=10) == {"timeout": "10"}
        await settled(server)


@pytest.mark.parametrize("varied", [False, True], ids=["same request", "varied requests"])
async def test_flood_from_one_socket_gets_less_back_than_it_sent(root: Path, varied: bool) -> None:
    async with running(TftpConfig(root=root, timeout_s=0.2, retries=2)) as server:
        # The same request again is a resend (one transfer); varied ones replace each other.
        requests = [
            build_request(RRQ, "small.bin", **({"x": n % 2} if varied else {})) for n in range(2000)
        ]

        def flood() -> tuple[int, int]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.2", 0))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                for request in requests:
                    sock.sendto(request, ("127.0.0.1", server.port))
                sock.settimeout(1.0)  # the last transfer's resends come 0.2 s apart
                received = 0
                try:
                    while True:
                        received += len(sock.recv(65536))
                except TimeoutError:
                    return sum(map(len, requests)), received

        sent, received = await asyncio.to_thread(flood)
        await settled(server)
    assert 0 < received <= sent
    if varied:
        assert server.stats["replaced"] >= 1 and server.stats["dropped"] > 0
    else:
        assert server.stats["duplicates"] > 0


async def test_a_new_request_from_the_same_port_replaces_its_transfer(root: Path) -> None:
    content = (root / "small.bin").read_bytes()
    async with running(TftpConfig(root=root, timeout_s=5)) as server:

        def go() -> bytes:
            with raw_socket() as sock:
                tids = []
                # A client that asks, asks the same again (a resend: the same transfer), then
                # gives up twice and asks anew (an unknown option changes the request only).
                for n in (1, 1, 2, 3):
                    sock.sendto(build_request(RRQ, "small.bin", x=n), ("127.0.0.1", server.port))
                    if n == 1 and tids:
                        continue
                    while True:
                        packet, tid = sock.recvfrom(65536)
                        if tid not in tids:
                            tids.append(tid)
                            break
                data, block = packet[4:], 1
                while len(packet) == 4 + 512:
                    sock.sendto(build_ack(block), tid)
                    packet, source = sock.recvfrom(65536)
                    if source != tid:
                        continue  # a late packet of a replaced transfer
                    assert struct.unpack_from("!HH", packet) == (DATA, (block + 1) & 0xFFFF)
                    data, block = data + packet[4:], block + 1
                sock.sendto(build_ack(block), tid)
                assert len(tids) == 3
                return data

        assert await asyncio.to_thread(go) == content
        await settled(server)
        assert server.stats["replaced"] == 2 and server.stats["duplicates"] == 1
        assert server.stats["completed"] == 1 and server.stats["failed"] == 2


async def test_per_address_limit_and_the_others_still_served(root: Path) -> None:
    async with running(TftpConfig(root=root, timeout_s=5, max_transfers_per_client=2)) as server:

        def go() -> list[bytes]:
            replies = []
            socks = [raw_socket() for _ in range(3)]
            for sock in socks:
                sock.bind(("127.0.0.2", 0))
                sock.sendto(build_request(RRQ, "small.bin"), ("127.0.0.1", server.port))
                replies.append(sock.recv(65536))
            for sock in socks:
                sock.close()
            return replies

        first, second, third = await asyncio.to_thread(go)
        assert struct.unpack_from("!HH", first) == struct.unpack_from("!HH", second) == (DATA, 1)
        code, message = error_of(third)
        assert code == ERR_UNDEFINED and "too many transfers" in message
        # Another address is not affected.
        reply, _ = await asyncio.to_thread(
            lambda: exchange_from("127.0.0.1", server.port, build_request(RRQ, "small.bin"))
        )
        assert struct.unpack_from("!HH", reply) == (DATA, 1)


async def test_a_full_server_shares_its_slots_out_by_address(root: Path) -> None:
    async with running(TftpConfig(root=root, timeout_s=5, max_transfers=2)) as server:
        request = build_request(RRQ, "small.bin")

        def first_packet(address: str) -> bytes:
            with raw_socket() as sock:  # never acknowledges; its transfer waits 5 s a round
                sock.bind((address, 0))
                sock.sendto(request, ("127.0.0.1", server.port))
                return sock.recv(65536)

        async def ask(address: str) -> bytes:
            return await asyncio.to_thread(first_packet, address)

        # One address holds both slots: a machine with none gets one of them.
        assert struct.unpack_from("!HH", await ask("127.0.0.2"))[0] == DATA
        assert struct.unpack_from("!HH", await ask("127.0.0.2"))[0] == DATA
        assert struct.unpack_from("!HH", await ask("127.0.0.3"))[0] == DATA
        assert server.stats["reclaimed"] == 1
        # One slot each, both waiting for less than a round: nothing to take from anyone.
        code, message = error_of(await ask("127.0.0.4"))
        assert code == ERR_UNDEFINED and "busy" in message
        assert sorted(len(held) for held in server._by_address.values()) == [1, 1]


def exchange_from(address: str, port: int, packet: bytes) -> tuple[bytes, tuple[str, int]]:
    with raw_socket() as sock:
        sock.bind((address, 0))
        sock.sendto(packet, ("127.0.0.1", port))
        return sock.recvfrom(65536)


async def test_an_error_from_the_client_ends_its_transfer(root: Path) -> None:
    # What PXE firmware does after asking for tsize: ERROR 8, then a request of its own.
    # The client's port stays open, so only the ERROR can end the transfer in time (the
    # next resend would be a minute away).
    async with running(TftpConfig(root=root, timeout_s=60)) as server:
        with raw_socket() as sock:

            def go() -> None:
                sock.sendto(build_request(RRQ, "small.bin", tsize=0), ("127.0.0.1", server.port))
                oack, tid = sock.recvfrom(65536)
                assert struct.unpack_from("!H", oack)[0] == OACK
                sock.sendto(build_error(8, "tsize only"), tid)

            await asyncio.to_thread(go)
            await until(lambda: not server.transfers, "the transfer ended")
        assert server.stats["failed"] == 1


async def test_an_error_packet_is_never_answered(server: TftpServer) -> None:
    def go() -> bytes:
        with raw_socket() as sock:
            for packet in (build_error(0, "who are you"), struct.pack("!H", ERROR)):
                sock.sendto(packet, ("127.0.0.1", server.port))
            sock.sendto(build_request(RRQ, "small.bin"), ("127.0.0.1", server.port))
            # An answer to the ERRORs would have been sent first, by the same listener.
            return sock.recv(65536)

    first = await asyncio.to_thread(go)
    assert struct.unpack_from("!HH", first) == (DATA, 1)
    assert server.stats["errors_ignored"] == 2


async def test_a_flood_is_summed_up_in_the_log(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamboot.boot.tftp")
    async with running(TftpConfig(root=root, client_requests_per_s=1000)) as server:

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.2", 0))
                sock.settimeout(5)
                for _ in range(600):
                    sock.sendto(build_request(RRQ, "missing.bin"), ("127.0.0.1", server.port))
                    sock.recv(65536)  # each is refused: file not found

        await asyncio.to_thread(flood)
        assert server.stats["refused"] == 600
    lines = [r.getMessage() for r in caplog.records if r.name == "streamboot.boot.tftp"]
    refused = [line for line in lines if "refused request" in line]
    summaries = [line for line in lines if "more lines not logged" in line]
    assert 1 <= len(refused) <= 20
    assert len(summaries) == 1 and "file not found" in summaries[0]
    assert "127.0.0.2" in summaries[0]
