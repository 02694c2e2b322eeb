"""A session's bytes, live and at its end, agree everywhere: real NBD clients (qemu-io: one
writes and leaves, one reads and holds its connection open) through a real stream node; the REST API
(`session list`), the console's Sessions page and dashboard (a real browser), `status` and
the session's SessionClosed all show the same figures."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.registry.console.pages import _size as size_text
from tests.conftest import wait_for
from tests.registry.conftest import Registry, write_image
from tests.registry.test_console_browser import CHROMIUM, browser, log_in, page, shot
from tests.registry.test_maintenance import data_plane, provision, qemu_io

__all__ = ["browser", "page"]  # fixtures
MiB = 1 << 20
MAC = "52:54:00:c0:00:77"
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium"),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) missing"),
]
READ, WRITTEN = 3 * MiB, 64 * 1024


async def test_a_sessions_bytes_agree_live_and_at_its_end(
    page: Any, registry: Registry, tmp_path: Path
) -> None:
    image = write_image(registry.data_dir / "base.raw", 8 * MiB, {0: b"MBR"})
    await provision(registry, MAC, "counted-001", "lab", image)
    async with data_plane(registry, f"stream-bytes-{os.getpid()}"):
        s = await registry.app.open_session(MAC)
        sid = s["session_id"]
        # The nodes' counters are per process, and this test's node shares the test runner's
        # process with every earlier test's node: the figure to check is what this adds.
        before = await streamed_so_far(registry)
        # A first client writes and leaves (its SessionDetached counts the write)...
        await qemu_io(s["nbd_uri"], f"write -P 0x5a {4 * MiB} {WRITTEN}")
        # ...a second one reads, its commands from stdin: its connection stays open. One
        # command per write, each after the last is done: qemu-io (not a terminal) waits
        # for its stdin to be readable, then takes one line with fgets; a second line sent
        # with the first stays in stdio's buffer, unrun, until more input comes.
        client = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", s["nbd_uri"],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert client.stdin is not None
        client.stdin.write(f"read 0 {READ}\n".encode())
        await client.stdin.drain()

        async def listed() -> dict[str, Any]:
            async with registry.http() as http:
                [one] = (await http.get("/sessions")).json()
            return one

        seen: list[Any] = []

        async def moved() -> bool:
            one = await listed()
            seen.append((one.get("bytes_read"), one.get("bytes_written"), one["attached"]))
            return (one["bytes_read"], one["bytes_written"]) == (READ, WRITTEN)

        # Live: the client is still attached, no SessionDetached yet.
        try:
            await wait_for(moved, "the session's bytes while its client is attached", 60)
        finally:
            print("sessions' bytes seen:", seen[-3:], registry.app.projection.sessions)
        assert (await listed())["attached"] == 1  # the reader's connection
        code, out, _ = await registry.cli("session", "list")
        assert code == 0 and "3.0 / 0.1" in out, out

        await log_in(page, registry)
        await page.goto(registry.api_url + "/console/sessions")
        row = page.locator(f"tr[data-session='{sid}']")
        await row.wait_for()
        assert await row.locator("[data-bytes-read]").get_attribute("data-bytes-read") == str(READ)
        written = await row.locator("[data-bytes-written]").get_attribute("data-bytes-written")
        assert written == str(WRITTEN)
        await shot(page, tmp_path, "sessions-bytes")

        # The stream node's own counters (status, the dashboard).
        async def streamed() -> bool:
            return await streamed_so_far(registry) == before + READ + WRITTEN

        await wait_for(streamed, "status to count the node's bytes", 30)
        await page.goto(registry.api_url + "/")
        total = size_text(before + READ + WRITTEN)
        await page.wait_for_selector(f"[data-stat='streamed']:has-text('{total}')")
        assert await page.inner_text("[data-stat='sessions-bytes']") == "3.1 MiB"
        # The cache node's free space, from its heartbeat (the page read a wrong field).
        free = await page.inner_text("[data-free='cache']")
        assert "server-disk" in free and "iB" in free, free
        await shot(page, tmp_path, "dashboard-bytes")

        client.stdin.write(b"quit\n")
        await client.stdin.drain()
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, out.decode()
        await wait_for(lambda: registry.app.projection.sessions[sid]["attached"] == 0, "detach")
        await registry.app.close_session(sid)
    [closed] = await registry.app.events(type_="SessionClosed", limit=5)
    assert (closed["data"]["bytes_read"], closed["data"]["bytes_written"]) == (READ, WRITTEN)
    detached = await registry.app.events(type_="SessionDetached", limit=5)
    assert sum(e["data"]["bytes_read"] for e in detached) == READ
    assert sum(e["data"]["bytes_written"] for e in detached) == WRITTEN
    assert page.errors == [], page.errors


async def streamed_so_far(registry: Registry) -> int:
    """`status`'s bytes streamed, once the stream node's heartbeat is in it."""
    status: dict[str, Any] = {}

    async def stream_beats() -> bool:
        _, out, _ = await registry.cli("status", "--json")
        status.update(json.loads(out))
        return any(b["service"] == "stream" and b["alive"] for b in status["instances"])

    await wait_for(stream_beats, "the stream node's heartbeat in status", 30)
    return int(status["figures"]["bytes_streamed"])
