"""The boot HTTP server under hostile connections (issue 26, item 4): slowloris from one host
is capped per address (STREAMBOOT_BOOT_HTTP_MAX_CONNECTIONS_PER_ADDRESS) and cut off after
the head's read timeout, and out of file descriptors the server refuses new connections, says
so a bounded number of times and serves again once descriptors are free. The good client is
curl; the hostile ones are plain sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.boot import http_server
from services.boot.http_server import HttpServer, Request, Response
from streamboot.embedded.proc import free_port
from tests.sockets import closed_at_once

pytestmark = pytest.mark.timeout(120)
CAP = 8
HOSTILE = "127.0.0.2"
TRICKLE = b"GET /hello HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 40


async def hello(request: Request) -> Response:
    return Response(200, "hello\n")


def curl(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/hello"],
        capture_output=True,
        text=True,
    )


@pytest.fixture
async def capped(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpServer]:
    monkeypatch.setattr(http_server, "READ_TIMEOUT_S", 3.0)
    server = HttpServer(hello, "127.0.0.1", 0, max_per_address=CAP)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until(check: object, what: str) -> None:
    for _ in range(400):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def test_slowloris_from_one_host_is_capped_cut_off_and_others_served(
    capped: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamboot.boot.http")
    port = capped.port
    slow = [socket.create_connection(("127.0.0.1", port), 10, (HOSTILE, 0)) for _ in range(CAP)]
    try:
        for s in slow:  # the first byte of a head that never ends
            s.sendall(TRICKLE[:1])
        await until(lambda: capped.connections.open[HOSTILE] == CAP, "all counted")
        for _ in range(20):  # the host holds the cap: each new connection is closed at once
            assert await asyncio.to_thread(closed_at_once, port, HOSTILE)
        got = await asyncio.to_thread(curl, port)  # another address is served meanwhile
        assert got.returncode == 0 and got.stdout == "hello\n", got.stderr
        assert capped.connections.refused == 20
        said = [r for r in caplog.records if "(the cap)" in r.getMessage()]
        assert 1 <= len(said) < 20  # rate-limited, not a line per refusal

        # A head still unfinished after the read timeout is answered 408 and closed,
        # however slowly it keeps coming: the host's places are free again.
        for i in range(1, 8):
            for s in slow:
                with contextlib.suppress(OSError):  # already answered and closed
                    s.sendall(TRICKLE[i : i + 1])
            await asyncio.sleep(0.5)
        await until(lambda: not capped.connections.open, "the trickling connections ended")
        for s in slow:
            s.settimeout(5)
            try:
                got = s.recv(4096)
            except ConnectionResetError:  # the 408 lost to a byte sent after it
                got = b""
            assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
        again = socket.create_connection(("127.0.0.1", port), 10, (HOSTILE, 0))
        await until(lambda: capped.connections.open[HOSTILE] == 1, "a new one taken")
        again.close()
    finally:
        for s in slow:
            s.close()


async def test_at_the_total_the_oldest_waiting_connection_makes_room() -> None:
    """Connections from many addresses that never finish a request hold the total: curl
    still gets in, and the oldest of them is closed for it."""
    server = HttpServer(hello, "127.0.0.1", 0, max_per_address=0, max_waiting=CAP)
    await server.start()
    held = []
    try:
        for i in range(CAP):
            s = socket.create_connection(("127.0.0.1", server.port), 10, (f"127.0.3.{i + 1}", 0))
            held.append(s)
            await until(lambda n=i + 1: len(server.waiting.open) == n, "counted")
        got = await asyncio.to_thread(curl, server.port)
        assert got.returncode == 0 and got.stdout == "hello\n", got.stderr
        assert server.waiting.shed >= 1 and server.connections.refused == 0
        held[0].settimeout(5)
        assert held[0].recv(4096) == b""  # the oldest, closed without an answer
        assert "127.0.3.1" not in server.waiting.open and "127.0.3.8" in server.waiting.open
    finally:
        for s in held:
            s.close()
        await server.stop()


async def test_no_cap_when_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HttpServer(hello, "127.0.0.1", 0, max_per_address=0)
    await server.start()
    held = [socket.create_connection(("127.0.0.1", server.port), 10, (HOSTILE, 0))]
    try:
        held += [
            socket.create_connection(("127.0.0.1", server.port), 10, (HOSTILE, 0))
            for _ in range(3 * CAP)
        ]
        await until(lambda: server.connections.open[HOSTILE] == 3 * CAP + 1, "all taken")
        assert server.connections.refused == 0
    finally:
        for s in held:
            s.close()
        await server.stop()


def serve(port: int, max_waiting: int = 0) -> None:
    """The boot HTTP server alone in this process (the out-of-descriptors test runs it
    under a low limit, the memory test with a total)."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")

    async def main() -> None:
        server = HttpServer(hello, "127.0.0.1", port, max_per_address=0, max_waiting=max_waiting)
        await server.start()
        await asyncio.Event().wait()

    uvloop.run(main())


def greeted(port: int) -> socket.socket | None:
    """A connection the server answers a request on (kept open), or None (refused)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(4096)
    except (ConnectionError, TimeoutError):
        return None
    if answer.startswith(b"HTTP/1.1 200"):
        return s
    s.close()
    return None


def test_out_of_descriptors_refuses_says_so_and_serves_again(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "http.log"
    code = f"from tests.boot.test_http_limits import serve; serve({port})"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=48:48", sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while "boot http on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = 0
        for _ in range(80):  # more clients than descriptors
            s = greeted(port)
            if s is None:
                refused += 1
            else:
                held.append(s)
        assert refused >= 30 and len(held) < 48, (refused, len(held))
        assert proc.poll() is None, log.read_text()[-3000:]
        assert curl(port).returncode != 0  # refused, not hanging
        text = log.read_text()
        lines = [x for x in text.splitlines() if "out of file descriptors" in x]
        assert 1 <= len(lines) < refused, lines
        assert "boot http refuses new connections" in lines[0]
        assert "Traceback" not in text

        for s in held:
            s.close()
        held.clear()
        got = None
        for _ in range(100):
            got = curl(port)
            if got.returncode == 0:
                break
            time.sleep(0.2)
        assert got is not None and got.stdout == "hello\n", "not served once descriptors are free"
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait()
