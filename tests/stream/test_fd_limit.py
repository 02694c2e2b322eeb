"""File descriptors (issue 28 item 4): a service raises its soft limit to the hard one at
start and says so in its heartbeat; out of descriptors, a stream node refuses connections
with one log line per interval and goes on serving, instead of spinning on its backlog.

A real stream service process started by ``prlimit`` with a low limit, on the test NATS;
the clients are plain TCP connections to its NBD port (the greeting proves one is served)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shared import bus
from shared.heartbeat import read_heartbeats
from streamboot.commands.status import fds_cell
from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc
from tests.conftest import BusServer

pytestmark = pytest.mark.timeout(120)
SOFT, HARD = 32, 96
NBD_MAGIC = b"NBDMAGIC"


async def beat_of(nc: NATS, node: str, ready: Any = lambda b: True) -> dict[str, Any]:
    for _ in range(300):
        for beat in await read_heartbeats(nc.jetstream(), 30):
            if beat["service"] == "stream" and beat["node"] == node and ready(beat):
                return beat
        await asyncio.sleep(0.1)
    beats = await read_heartbeats(nc.jetstream(), 30)
    raise AssertionError(f"no such heartbeat from {node}; the last ones: {beats}")


def greeted(port: int) -> socket.socket | None:
    """A connection to the NBD port that got the server's greeting, or None (refused)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionError:  # reset before connect() returned: refused
        return None
    try:
        head = s.recv(8)
    except OSError:  # reset: refused
        head = b""
    if head == NBD_MAGIC:
        return s
    s.close()
    return None


async def test_out_of_fds_refuses_says_so_and_recovers(
    nats_server: BusServer, tmp_path: Path
) -> None:
    node, port = f"fds-{os.getpid()}", free_port()
    env = {
        **nats_server.env("stream"),
        "STREAMBOOT_DATA_DIR": str(tmp_path),
        "STREAMBOOT_NODE_ID": node,
        "STREAMBOOT_NBD_PORT": str(port),
        "STREAMBOOT_HTTP_STREAM_PORT": str(free_port()),
        "STREAMBOOT_ISCSI_PORT": str(free_port()),
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_HEARTBEAT_INTERVAL_S": "0.3",
        "STREAMBOOT_STREAM_USE_CACHE": "false",
        # No total on connections in their handshake: this test's clients stay in theirs,
        # and the total (half the limit) would shed them before the limit is reached.
        "STREAMBOOT_STREAM_MAX_HANDSHAKES": "-1",
    }
    log = tmp_path / "stream.log"
    limit = f"--nofile={SOFT}:{HARD}"
    proc = Proc(["prlimit", limit, sys.executable, "-m", "services.stream"], env, log)
    nc = await bus.connect(nats_server.url_for("test"), "fds-test")
    held: list[socket.socket] = []
    try:
        beat = await beat_of(nc, node)
        fds = beat["fds"]
        assert (fds["soft"], fds["hard"]) == (HARD, HARD), fds  # raised at start
        assert fds["refused"] == 0 and 0 < fds["open"] < HARD, fds
        assert fds_cell(beat, None) == f"{fds['open']}/{HARD}"

        # More clients than descriptors: the first are served, the rest refused at once.
        refused = 0
        for _ in range(HARD + 20):
            s = await asyncio.to_thread(greeted, port)
            if s is None:
                refused += 1
            else:
                held.append(s)
        assert refused >= 20 and len(held) < HARD, (refused, len(held))
        assert proc.p.poll() is None, log.read_text()[-3000:]
        # The stored beat may be one taken mid-way through the refusals: wait for one
        # that counts them all (if none does, beat_of fails after its 30 s).
        beat = await beat_of(nc, node, lambda b: b["fds"]["refused"] >= refused)
        assert "refused" in fds_cell(beat, None)
        lines = [x for x in log.read_text().splitlines() if "out of file descriptors" in x]
        assert 1 <= len(lines) < refused, lines  # rate-limited: not a line per client
        assert "nbd refuses new connections" in lines[0]
        assert "Traceback" not in log.read_text()

        # Descriptors back: the node serves again.
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 30
        again = None
        while again is None and time.monotonic() < deadline:
            again = await asyncio.to_thread(greeted, port)
            if again is None:
                await asyncio.sleep(0.2)
        assert again is not None, "the node does not serve once descriptors are free"
        again.close()
    finally:
        for s in held:
            s.close()
        await nc.close()
        proc.stop()
