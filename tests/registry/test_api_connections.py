"""The admin API under hostile connections (issue 26), on the real registry process: one host
is capped in open connections (STREAMBOOT_API_MAX_CONNECTIONS_PER_ADDRESS), connections from
many hosts waiting for a request head are capped in total (STREAMBOOT_API_MAX_WAITING, the
oldest closed first) and a head that trickles in is cut off (STREAMBOOT_API_HEAD_TIMEOUT_S),
while curl from elsewhere is served. The hostile clients are plain sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from services.registry.connection_caps import ConnectionCaps
from streamboot.embedded.proc import free_port
from tests.boot.test_http_limits import until
from tests.registry.test_api_door import Server, registry_api
from tests.sockets import closed_at_once

pytestmark = pytest.mark.timeout(120)
CAP = 8
TOTAL = 12
HEAD_TIMEOUT_S = 2
HOSTILE = "127.0.0.2"


@pytest.fixture
async def api(nats_url: str, database_url: str, data_dir: Path) -> AsyncIterator[Server]:
    settings = {
        "STREAMBOOT_API_MAX_CONNECTIONS_PER_ADDRESS": str(CAP),
        "STREAMBOOT_API_MAX_WAITING": str(TOTAL),
        "STREAMBOOT_API_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
    }
    async with registry_api(nats_url, database_url, data_dir, settings) as started:
        yield started


@contextlib.asynccontextmanager
async def uvicorn_capped(caps: ConnectionCaps) -> AsyncIterator[int]:
    """uvicorn in this process with the registry's capped protocol, serving /health; its port."""
    app = FastAPI()
    app.get("/health")(lambda: {"ok": True})
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=caps.protocol(), lifespan="off",
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        await task


def curl(port: int, source: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--interface", source, "-o", "/dev/null",
         "-w", "%{http_code}", f"http://127.0.0.1:{port}/health"],
        capture_output=True, text=True,
    )  # fmt: skip


def ends(s: socket.socket, trickle: bytes) -> bytes:
    """What the server sends before it closes ``s``, while a byte of ``trickle`` goes out
    every 0.2 s (a head that never ends; blocking: run it in a thread)."""
    got = b""
    s.settimeout(0.2)
    for i in range(300):
        with contextlib.suppress(OSError):  # closed already: the byte is refused
            s.sendall(trickle[i % len(trickle) : i % len(trickle) + 1])
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"never closed; got {got!r}")


TRICKLE = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 200


async def test_slowloris_from_one_host_is_capped_cut_off_and_others_served(
    api: Server,
) -> None:
    slow = [socket.create_connection(("127.0.0.1", api.port), 10, (HOSTILE, 0)) for _ in range(CAP)]
    try:
        for s in slow:
            s.sendall(TRICKLE[:1])
        for _ in range(10):  # the host holds the cap: each new connection is closed at once
            assert await asyncio.to_thread(closed_at_once, api.port, HOSTILE)
        got = await asyncio.to_thread(curl, api.port)  # another address is served meanwhile
        assert got.stdout == "200", got.stderr
        # However slowly the heads keep coming, each is cut off with a 408.
        answers = await asyncio.gather(*(asyncio.to_thread(ends, s, TRICKLE[1:]) for s in slow))
        for answer in answers:  # (a byte sent after the 408 may turn it into a reset)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
        assert any(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
        got = await asyncio.to_thread(curl, api.port, HOSTILE)  # its places are free again
        assert got.stdout == "200", got.stderr
    finally:
        for s in slow:
            s.close()
    logged = api.proc.log.read_text() if api.proc.log else ""
    said = [line for line in logged.splitlines() if "(the cap)" in line]
    assert 1 <= len(said) < 10  # rate-limited, not a line per refusal


async def test_a_kept_alive_connection_that_trickles_its_next_head_is_cut_off() -> None:
    async with uvicorn_capped(ConnectionCaps(CAP, TOTAL, HEAD_TIMEOUT_S)) as port:
        s = socket.create_connection(("127.0.0.1", port), 10)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"ok":true}'):  # the head and the body
                answer += await asyncio.to_thread(s.recv, 4096)
            assert answer.startswith(b"HTTP/1.1 200")
            # A byte a while keeps uvicorn's own keep-alive timeout from ever firing.
            assert await asyncio.to_thread(ends, s, TRICKLE) == b""
        finally:
            s.close()


async def test_at_the_total_the_oldest_waiting_connection_makes_room() -> None:
    """Connections from many addresses that never send a head hold the total: curl still
    gets in, and the oldest of them is closed for it (without the 408 of a late head)."""
    caps = ConnectionCaps(CAP, TOTAL, 60)
    async with uvicorn_capped(caps) as port:
        held = []
        for i in range(TOTAL):
            held.append(socket.create_connection(("127.0.0.1", port), 10, (f"127.0.3.{i + 1}", 0)))
            # counted in the order they came
            await until(lambda n=i + 1: len(caps.waiting.open) == n, "counted")
        try:
            got = await asyncio.to_thread(curl, port)
            assert got.stdout == "200", got.stderr
            assert caps.waiting.shed == 1 and caps.connections.refused == 0
            held[0].settimeout(10)
            assert await asyncio.to_thread(held[0].recv, 4096) == b""  # closed, no answer
            assert "127.0.3.1" not in caps.waiting.open and "127.0.3.12" in caps.waiting.open
        finally:
            for s in held:
                s.close()
