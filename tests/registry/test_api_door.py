"""The admin API's door against hostile bodies, on the real registry process (uvicorn):
no body is read before the token is checked, bodies are capped, and a bad body's error
names the field and the problem without echoing the input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc
from tests.registry.conftest import TOKEN

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20
CAP = 64 * 1024


@dataclass
class Server:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return psutil.Process(self.proc.p.pid).memory_info().rss


@pytest.fixture
async def server(nats_url: str, database_url: str, data_dir: Path) -> AsyncIterator[Server]:
    async with registry_api(
        nats_url, database_url, data_dir, {"STREAMBOOT_API_MAX_BODY_BYTES": str(CAP)}
    ) as started:
        yield started


@contextlib.asynccontextmanager
async def registry_api(
    nats_url: str, database_url: str, data_dir: Path, settings: dict[str, str]
) -> AsyncIterator[Server]:
    """A registry process serving its API on a free port, with ``settings`` besides."""
    port = free_port()
    env = {
        **settings,
        "STREAMBOOT_NATS_URL": nats_url,
        "STREAMBOOT_DATABASE_URL": database_url,
        "STREAMBOOT_DATA_DIR": str(data_dir),
        "STREAMBOOT_API_PORT": str(port),
        "STREAMBOOT_API_TOKEN": TOKEN,
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_NODE_ID": f"registry-door-{os.getpid()}",
    }
    proc = Proc([sys.executable, "-m", "services.registry"], env, data_dir / "registry.log")
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                assert proc.p.poll() is None, (data_dir / "registry.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield Server(proc, port)
    finally:
        proc.stop()


def post_streamed(
    port: int, path: str, total: int, token: str | None = None, chunked: bool = False
) -> tuple[int, bytes, int]:
    """POST ``total`` bytes in 1 MiB pieces (blocking: run it in a thread), stopping as soon
    as the server answers or hangs up; returns the status, the response's body and how many
    bytes of the body went out."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    if token:
        head.append(f"Authorization: Bearer {token}")
    piece = b"x" * MiB
    if chunked:
        piece = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(piece)
                sent += MiB
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server answered and hung up: the rest of the body is not wanted
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < length(raw):
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2], sent


def length(raw: bytes) -> int:
    """The Content-Length of a response's head (once it is in)."""
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def test_unauthenticated_bodies_are_refused_unread(server: Server) -> None:
    """Three 100 MB bodies without a token: 401 for each before its body is sent, and the
    server's memory does not grow with them (before the fix it read every body first)."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.post("/devices", json={"mac": "x"})).status_code == 401  # warm
    baseline = server.rss()
    peak = baseline
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, server.rss())
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    total = 100 * MiB
    results = await asyncio.gather(
        asyncio.to_thread(post_streamed, server.port, "/devices", total),
        asyncio.to_thread(post_streamed, server.port, "/vdisks/x/versions", total, "bad-token"),
        asyncio.to_thread(post_streamed, server.port, "/sessions", total, None, True),
    )
    sampling = False
    await sampler
    for status, body, sent in results:
        assert status == 401
        assert "token" in json.loads(body)["error"]
        assert sent < total  # answered before the body was in
    assert peak - baseline < 32 * MiB, f"server RSS grew by {(peak - baseline) / MiB:.0f} MiB"


async def test_bodies_over_the_cap_are_refused(server: Server) -> None:
    # Declared too big: refused from the head.
    status, body, sent = await asyncio.to_thread(
        post_streamed, server.port, "/devices", 100 * MiB, TOKEN
    )
    assert status == 413 and sent < 100 * MiB
    assert json.loads(body) == {
        "error": f"request body over the API's limit of {CAP} bytes",
        "kind": "too_large",
    }
    # Streamed past the cap (no Content-Length): cut off once it runs over.
    status, body, sent = await asyncio.to_thread(
        post_streamed, server.port, "/devices", 100 * MiB, TOKEN, True
    )
    assert status == 413 and sent < 100 * MiB
    assert json.loads(body)["kind"] == "too_large"
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        # A body under the cap still works, and the refusals are in the audit trail.
        r = await http.post("/devices", json={"mac": "52:54:00:00:00:01"})
        assert r.status_code == 201, r.text
        assert (await http.get("/devices")).json()[0]["mac"] == "52:54:00:00:00:01"


async def test_bad_bodies_are_named_not_echoed(server: Server) -> None:
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        big = "A" * 50_000
        r = await http.post("/devices", json={"mac": big})
        assert r.status_code == 400
        assert r.json() == {
            "error": "invalid request: body.mac: String should have at most 64 characters",
            "kind": "invalid",
        }
        r = await http.post(
            "/devices",
            content=b'{"mac": "' + b"B" * 50_000,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400 and "BBBB" not in r.text and len(r.content) < 1000
        assert r.json()["error"].startswith("invalid request: body")
        r = await http.post("/assignments", json=[{"target": "C" * 1000}] * 40)
        assert r.status_code == 400 and "CCCC" not in r.text and len(r.content) < 1000
        r = await http.post("/vdisks/win/promote", json={"version": "D" * 40_000, "to": "x"})
        assert r.status_code == 400 and "DDDD" not in r.text and len(r.content) < 1000
        assert "body.version" in r.json()["error"] and "body.to" in r.json()["error"]
        # Session opens have a route of their own in front of FastAPI's: the same answers.
        r = await http.post("/sessions", json={"mac": big})
        assert r.status_code == 400
        assert r.json() == {
            "error": "invalid request: body.mac: String should have at most 64 characters",
            "kind": "invalid",
        }
        r = await http.post("/sessions", json=["52:54:00:00:00:09"])
        assert r.status_code == 400 and r.json()["error"].startswith("invalid request: body")
        r = await http.post(
            "/sessions", content=b'{"mac": "52:54', headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"].startswith("invalid request: body")
        r = await http.post("/sessions", json={"mac": "not a MAC"})
        assert (r.status_code, r.json()["kind"]) == (400, "invalid"), r.text
        assert "invalid MAC" in r.json()["error"]
        # A domain error quoting a long input is cut short.
        r = await http.get("/devices/" + "E" * 5000)
        assert r.status_code == 400 and "invalid MAC" in r.json()["error"]
        assert len(r.json()["error"]) <= 500
