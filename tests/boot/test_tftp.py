"""The TFTP server against real clients (curl, tftp-hpa), our windowed client, and raw
crafted packets for the failure cases."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
from pathlib import Path

import pytest

from services.boot.tftp_client import fetch
from services.boot.tftp_packets import (
    ACK,
    DATA,
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERROR,
    OACK,
    RRQ,
    WRQ,
    TftpError,
    build_ack,
    build_request,
    parse_oack,
)
from services.boot.tftp_server import TftpConfig, TftpServer, running

pytestmark = pytest.mark.timeout(60)


async def run(*cmd: str, cwd: Path | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (cmd, out, err)


def raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    return sock


async def exchange(server: TftpServer, packet: bytes) -> tuple[bytes, tuple[str, int]]:
    def go() -> tuple[bytes, tuple[str, int]]:
        with raw_socket() as sock:
            sock.sendto(packet, ("127.0.0.1", server.port))
            return sock.recvfrom(65536)

    return await asyncio.to_thread(go)


async def settled(server: TftpServer) -> None:
    """Wait until every transfer has ended (a transfer reports its end from its thread)."""
    for _ in range(100):
        if not server.transfers:
            return
        await asyncio.sleep(0.05)


def error_of(packet: bytes) -> tuple[int, str]:
    opcode, code = struct.unpack_from("!HH", packet)
    assert opcode == ERROR, packet
    return code, packet[4:].rstrip(b"\0").decode()


@pytest.mark.parametrize("blksize", [None, 8, 1468, 65464])
async def test_curl_downloads(
    server: TftpServer, root: Path, tmp_path: Path, blksize: int | None
) -> None:
    out = tmp_path / "out.bin"
    opts = ["--tftp-blksize", str(blksize)] if blksize else []
    await run("curl", "-sf", *opts, "-o", str(out), f"tftp://127.0.0.1:{server.port}/small.bin")
    assert out.read_bytes() == (root / "small.bin").read_bytes()
    await run(
        "curl", "-sf", *opts, "-o", str(out), f"tftp://127.0.0.1:{server.port}/sub/nested.bin"
    )
    assert out.read_bytes() == (root / "sub" / "nested.bin").read_bytes()


async def test_tftp_hpa_binary_and_netascii(server: TftpServer, root: Path, tmp_path: Path) -> None:
    port = str(server.port)
    await run(
        "tftp", "-m", "binary", "127.0.0.1", port, "-c", "get", "exact.bin", str(tmp_path / "e")
    )
    assert (tmp_path / "e").read_bytes() == (root / "exact.bin").read_bytes()
    await run(
        "tftp", "-m", "binary", "127.0.0.1", port, "-c", "get", "empty.bin", str(tmp_path / "z")
    )
    assert (tmp_path / "z").read_bytes() == b""
    # netascii goes out as CR LF / CR NUL; tftp-hpa turns it back into the original bytes.
    await run(
        "tftp", "-m", "ascii", "127.0.0.1", port, "-c", "get", "text.txt", str(tmp_path / "t")
    )
    assert (tmp_path / "t").read_bytes() == (root / "text.txt").read_bytes()


@pytest.mark.parametrize(("blksize", "windowsize"), [(512, 16), (1468, 64), (8192, 16)])
async def test_atftp_windowed(
    server: TftpServer, root: Path, tmp_path: Path, blksize: int, windowsize: int
) -> None:
    # atftp is a windowsize (RFC 7440) client nobody here wrote.
    out = tmp_path / "out.bin"
    await run(
        "atftp", "--option", f"blksize {blksize}", "--option", f"windowsize {windowsize}",
        "-g", "-r", "small.bin", "-l", str(out), "127.0.0.1", str(server.port),
    )  # fmt: skip
    assert out.read_bytes() == (root / "small.bin").read_bytes()
    # atftp may exit before the server's thread has read its last ACK.
    await settled(server)
    assert server.stats["completed"] == 1


async def test_window_is_capped_to_what_a_socket_buffer_holds(server: TftpServer) -> None:
    # 64 blocks of 8 KiB would overflow the client's default receive buffer every window.
    _, acked = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "small.bin", blksize=8192, windowsize=64
    )
    assert acked["windowsize"] == str(128 * 1024 // 8192)
    _, acked = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "small.bin", blksize=512, windowsize=64
    )
    assert acked["windowsize"] == "64"


async def test_windowsize_tsize_and_oack(server: TftpServer, root: Path) -> None:
    data, acked = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "small.bin", blksize=1468, windowsize=16, tsize=True
    )
    assert data == (root / "small.bin").read_bytes()
    assert acked["blksize"] == "1468" and acked["windowsize"] == "16"
    assert acked["tsize"] == "100000"
    data, _ = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "exact.bin", blksize=512, windowsize=3
    )
    assert data == (root / "exact.bin").read_bytes()


async def test_block_numbers_roll_over(server: TftpServer, root: Path) -> None:
    # 8-byte blocks: 70000 blocks, past the 16-bit block counter.
    (root / "big.bin").write_bytes(os.urandom(70_000 * 8 + 3))
    data, _ = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "big.bin", blksize=8, windowsize=64
    )
    assert data == (root / "big.bin").read_bytes()


async def test_many_transfers_at_once(root: Path, tmp_path: Path) -> None:
    # All clients share 127.0.0.1 here: the per-address limits stand for many machines.
    config = TftpConfig(root=root, max_transfers_per_client=64, client_requests_per_s=100)
    async with running(config) as server:
        await many_transfers(server, root, tmp_path)


async def many_transfers(server: TftpServer, root: Path, tmp_path: Path) -> None:
    expected = (root / "small.bin").read_bytes()
    fetches = [
        asyncio.to_thread(fetch, "127.0.0.1", server.port, "small.bin", blksize=512, windowsize=w)
        for w in (1, 2, 4, 8, 16) * 4
    ]
    curls = [
        run(
            "curl",
            "-sf",
            "-o",
            str(tmp_path / f"c{i}"),
            f"tftp://127.0.0.1:{server.port}/small.bin",
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*fetches, *curls)
    assert all(data == expected for data, _ in results[: len(fetches)])
    assert all((tmp_path / f"c{i}").read_bytes() == expected for i in range(8))
    await settled(server)
    assert server.stats["completed"] == len(fetches) + len(curls)
    assert not server.transfers


@pytest.mark.parametrize(
    "name",
    ["../secret", "/etc/passwd", "sub/../../secret", "sub/../small.bin", "..\\secret", "link-out"],
)
async def test_paths_outside_the_root_are_refused(server: TftpServer, name: str) -> None:
    reply, _ = await exchange(server, build_request(RRQ, name))
    code, message = error_of(reply)
    assert code == ERR_ACCESS, message


async def test_symlink_inside_the_root_is_served(server: TftpServer, root: Path) -> None:
    data, _ = await asyncio.to_thread(fetch, "127.0.0.1", server.port, "link-in")
    assert data == (root / "small.bin").read_bytes()


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (build_request(RRQ, "missing.bin"), ERR_NOT_FOUND),
        (build_request(RRQ, "sub"), ERR_NOT_FOUND),  # a directory
        (build_request(WRQ, "small.bin"), ERR_ACCESS),  # read-only
        (b"\x00", ERR_ILLEGAL),
        (b"\x00\x01small.bin", ERR_ILLEGAL),  # not NUL-terminated
        (b"\x00\x01small.bin\x00", ERR_ILLEGAL),  # no mode
        (b"\x00\x01small.bin\x00weird\x00", ERR_ILLEGAL),  # unknown mode
        (b"\x00\x01\xff\xfe\x00octet\x00", ERR_ILLEGAL),  # not ASCII
        (b"\x00\x03\x00\x01data", ERR_ILLEGAL),  # DATA to the listener
        (b"\x00\x09junk\x00", ERR_ILLEGAL),  # unknown opcode
    ],
)
async def test_bad_requests_get_an_error_packet(
    server: TftpServer, root: Path, packet: bytes, code: int
) -> None:
    reply, _ = await exchange(server, packet)
    assert error_of(reply)[0] == code
    # ... and the server still serves.
    data, _ = await asyncio.to_thread(fetch, "127.0.0.1", server.port, "small.bin")
    assert data == (root / "small.bin").read_bytes()


async def test_bad_options_are_ignored(server: TftpServer, root: Path) -> None:
    packet = build_request(RRQ, "small.bin", blksize=3, windowsize=0, timeout=999, color=5)  # type: ignore[arg-type]
    reply, _ = await exchange(server, packet)
    # No acceptable option: no OACK, the data starts with the default block size.
    opcode, block = struct.unpack_from("!HH", reply)
    assert (opcode, block, len(reply)) == (DATA, 1, 4 + 512)


async def test_client_that_stops_acknowledging(server: TftpServer, root: Path) -> None:
    def go() -> list[bytes]:
        with raw_socket() as sock:
            sock.sendto(build_request(RRQ, "small.bin"), ("127.0.0.1", server.port))
            packets = []
            while True:  # never acknowledge: DATA 1, its resends, then an ERROR
                packet, _ = sock.recvfrom(65536)
                packets.append(packet)
                if packet[:2] == struct.pack("!H", ERROR):
                    return packets

    packets = await asyncio.to_thread(go)
    assert [struct.unpack_from("!HH", p) for p in packets[:-1]] == [(DATA, 1)] * 3  # 1 + 2 retries
    assert error_of(packets[-1])[0] == 0
    await settled(server)
    assert server.stats["failed"] == 1 and not server.transfers


async def test_window_resumes_after_a_partial_ack(server: TftpServer, root: Path) -> None:
    content = (root / "small.bin").read_bytes()

    def go() -> list[tuple[int, bytes]]:
        with raw_socket() as sock:
            sock.sendto(
                build_request(RRQ, "small.bin", blksize=512, windowsize=4),
                ("127.0.0.1", server.port),
            )
            oack, peer = sock.recvfrom(65536)
            assert struct.unpack_from("!H", oack)[0] == OACK
            assert parse_oack(oack) == {"blksize": "512", "windowsize": "4"}
            sock.sendto(build_ack(0), peer)
            first = [sock.recvfrom(65536)[0] for _ in range(4)]
            assert [struct.unpack_from("!HH", p)[1] for p in first] == [1, 2, 3, 4]
            sock.sendto(build_ack(2), peer)  # as if 3 and 4 were lost
            again = [sock.recvfrom(65536)[0] for _ in range(4)]
            # A stray ACK from an unknown port does not disturb the transfer.
            with raw_socket() as other:
                other.sendto(struct.pack("!HH", ACK, 9), peer)
            return [(struct.unpack_from("!HH", p)[1], p[4:]) for p in again]

    blocks = await asyncio.to_thread(go)
    assert [n for n, _ in blocks] == [3, 4, 5, 6]
    assert all(data == content[(n - 1) * 512 : n * 512] for n, data in blocks)


async def test_unreachable_client_ends_the_transfer(server: TftpServer) -> None:
    def go() -> None:
        sock = raw_socket()
        sock.sendto(build_request(RRQ, "small.bin"), ("127.0.0.1", server.port))
        sock.recvfrom(65536)
        sock.close()  # gone: the next resend meets ICMP port unreachable

    await asyncio.to_thread(go)
    await settled(server)
    assert not server.transfers and server.stats["failed"] == 1


async def test_tftp_error_from_client_is_reported(server: TftpServer) -> None:
    with pytest.raises(TftpError) as info:
        await asyncio.to_thread(fetch, "127.0.0.1", server.port, "../secret")
    assert info.value.code == ERR_ACCESS


def test_tftp_hpa_is_installed() -> None:
    # The real-client tests need these Debian packages (see docs/boot.md).
    assert shutil.which("tftp") and shutil.which("curl") and shutil.which("atftp")


async def test_windows_without_udp_gso(
    server: TftpServer, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kernels or NICs without UDP GSO: the same window goes out one packet per send.
    import services.boot.tftp_server as tftp_server

    monkeypatch.setattr(tftp_server, "_gso_usable", False)
    data, acked = await asyncio.to_thread(
        fetch, "127.0.0.1", server.port, "small.bin", blksize=1000, windowsize=8
    )
    assert data == (root / "small.bin").read_bytes() and acked["windowsize"] == "8"


async def test_file_truncated_during_a_transfer(server: TftpServer, root: Path) -> None:
    # The file is mapped: a send from pages that are gone fails (EFAULT), never a SIGBUS.
    (root / "shrinking.bin").write_bytes(os.urandom(64 * 1024))

    def go() -> list[bytes]:
        with raw_socket() as sock:
            sock.sendto(build_request(RRQ, "shrinking.bin"), ("127.0.0.1", server.port))
            first, peer = sock.recvfrom(65536)
            os.truncate(root / "shrinking.bin", 0)
            packets = [first]
            for block in range(1, 40):  # acknowledge on until the server says no
                sock.sendto(build_ack(block), peer)
                packets.append(sock.recvfrom(65536)[0])
                if packets[-1][:2] == struct.pack("!H", ERROR):
                    break
            return packets

    packets = await asyncio.to_thread(go)
    code, message = error_of(packets[-1])
    assert code == 0 and "shrank" in message
    await settled(server)
    assert server.stats["failed"] == 1 and not server.transfers
    # The server is unharmed: the next transfer works.
    data, _ = await asyncio.to_thread(fetch, "127.0.0.1", server.port, "small.bin")
    assert data == (root / "small.bin").read_bytes()


async def test_stop_ends_transfers_in_progress(root: Path) -> None:
    async with running(TftpConfig(root=root, timeout_s=5, retries=5)) as server:

        def begin() -> None:
            with raw_socket() as sock:  # takes block 1, never acknowledges
                sock.sendto(build_request(RRQ, "small.bin"), ("127.0.0.1", server.port))
                sock.recvfrom(65536)

        await asyncio.to_thread(begin)
        assert len(server.transfers) == 1
        transfer = next(iter(server.transfers))
    # Without the stop it would wait 5 x 5 s for ACKs; the stop ended its thread at once.
    assert not transfer.thread.is_alive()
