"""Sessions announced by the registry are opened before their client connects.

A real cache service and nats-server; the stream node's servers run in this process (so the
test can look at its sessions) and listen for announcements as the stream service does; the
clients are qemu-io over real NBD connections.

- an announced session's write cache is placed at the cache service before any client
  connects; the client's connection then finds the session open, writes and reads back;
  its boot clock (BlocksRequested times) starts at the connection, not at the announcement;
- an announcement and the client's connection arriving together share one open;
- a client that connects while its announced session is still attaching (the cache service
  held up, SIGSTOP) gets its NBD handshake at once; its requests wait and are then served;
  if the attach fails instead (the cache service killed), the connection ends, the log says
  why, and the client's next connection gets the reason in the handshake;
- an announced session no client claims is dropped after ``announced_wait_s``;
- a malformed announcement is a warning in the log, and the next one still works.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from services.stream.announce import listen_for_announcements
from services.stream.path.cached_store import CacheLink
from services.stream.server import StreamServers
from services.stream.sessions import Session, SessionManager
from services.stream.settings import StreamSettings
from shared.contracts.cache.client import CacheClient, all_write_caches
from shared.contracts.stream import announce_session, prepare_subject
from shared.events import BlocksRequested
from tests.cache.conftest import Proc, System, export, qemu_io, run
from tests.cache.stream_node import export_specs
from tests.conftest import wait_for
from tests.doubles import ListSink, StaticResolver

pytestmark = pytest.mark.timeout(120)

NODE = "stream-announced"


class Node:
    """Stream servers wired to the cache service and to the announcement subject."""

    def __init__(
        self,
        nc: nats.NATS,
        exports: dict[str, dict[str, Any]],
        wait_s: float,
        cache_timeout_s: float = 10.0,
        outage_grace_s: float = 30.0,
    ):
        self.nc = nc
        self.exports = exports
        self.sink = ListSink()
        settings = StreamSettings(nbd_port=0, http_port=0, node_id=NODE, announced_wait_s=wait_s)
        self.servers = StreamServers(StaticResolver(export_specs(exports)), self.sink, settings)
        client = CacheClient(nc, timeout_s=cache_timeout_s)
        self.servers.sessions.cache = CacheLink(client, outage_grace_s=outage_grace_s)

    async def start(self) -> str:
        await self.servers.start()
        await listen_for_announcements(self.nc, NODE, self.servers.sessions)
        return f"nbd://127.0.0.1:{self.servers.nbd_port}"

    async def announce(self, token: str) -> None:
        await announce_session(self.nc, NODE, token, self.exports[token])
        await self.nc.flush()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


async def cached_sessions(nc: nats.NATS) -> set[str]:
    caches, _ = await all_write_caches(nc)
    return {c["session_id"] for c in caches}


@pytest.fixture
async def node_for(
    system: Callable[..., System], nc: nats.NATS, base_image: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[Proc, Node, str]]]]:
    """A cache service and a started Node exporting one token: (cache, node, nbd URI)."""
    started: list[Node] = []

    async def make(
        token: str, wait_s: float = 60.0, cache_timeout_s: float = 10.0, grace_s: float = 30.0
    ) -> tuple[Proc, Node, str]:
        cache = await system().start_cache()
        node = Node(nc, export(token, base_image), wait_s, cache_timeout_s, grace_s)
        started.append(node)
        return cache, node, await node.start()

    yield make
    for node in started:
        await node.servers.stop()


async def attaching(sessions: SessionManager, token: str) -> Session:
    """The announced session of ``token``, once it is attaching (``ready`` pending)."""

    def started() -> bool:
        s = sessions.sessions.get(token)
        return s is not None and s.ready is not None

    await wait_for(started, f"the announced session {token} to start attaching")
    return sessions.sessions[token]


async def test_an_announced_session_is_ready_before_its_client_connects(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]], nc: nats.NATS
) -> None:
    _cache, node, uri = await node_for("early")
    sessions = node.servers.sessions
    await node.announce("early")

    async def placed() -> bool:
        return "session-early" in await cached_sessions(nc)

    await wait_for(placed, "the cache service to hold the announced session's cache")
    session = sessions.sessions["early"]
    assert session.announced and session.connections == 0

    await asyncio.sleep(1.0)  # the client takes its time (fetching its boot script...)
    await asyncio.to_thread(
        qemu_io, f"{uri}/early", "read 8M 4k", "write -P 7 0 64k", "read -P 7 0 64k"
    )
    assert sessions.sessions["early"] is session  # the connection used the opened one
    assert not session.announced

    # qemu-io has exited, but the node may not have read its socket's end yet; the
    # extents go out when the connection detaches.
    await wait_for(lambda: session.connections == 0, "the node to see the client leave")
    await sessions.drain_events()
    [first, *_] = [
        ext
        for e in node.sink.of_type(BlocksRequested)
        for ext in e.extents  # type: ignore[attr-defined]
    ]
    # Times count from the client's connection, not from the announcement 1 s earlier.
    assert first[0] < 900, first


async def test_an_announcement_and_its_client_arriving_together_share_one_open(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]], nc: nats.NATS
) -> None:
    _cache, node, uri = await node_for("together")
    await node.announce("together")
    await asyncio.to_thread(qemu_io, f"{uri}/together", "write -P 9 4k 4k", "read -P 9 4k 4k")
    caches, _ = await all_write_caches(nc)
    assert [c["session_id"] for c in caches].count("session-together") == 1
    assert list(node.servers.sessions.sessions) == ["together"]


async def test_a_client_during_the_attach_is_answered_at_once_and_served_after_it(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]],
) -> None:
    cache, node, uri = await node_for("early-client")
    try:
        cache.p.send_signal(signal.SIGSTOP)  # the cache service holds up every open
        await node.announce("early-client")
        session = await attaching(node.servers.sessions, "early-client")
        client = asyncio.create_task(
            asyncio.to_thread(
                qemu_io, f"{uri}/early-client", "write -P 3 64k 4k", "read -P 3 64k 4k"
            )
        )
        # The handshake is over (the connection is the session's) while it still attaches.
        await wait_for(lambda: bool(session.conns), "the client's handshake")
        assert session.ready is not None and not client.done()
        await asyncio.sleep(0.5)
        assert not client.done()  # its requests wait for the attach
        cache.p.send_signal(signal.SIGCONT)
        await client  # then they are served: written and read back
        assert session.ready is None and not session.closed
    finally:
        cache.p.send_signal(signal.SIGCONT)


async def test_a_client_whose_announced_session_fails_to_attach_is_told_why(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The open waits for the cache service for up to 1 s (the outage grace) after its
    # first attempt, then fails.
    cache, node, uri = await node_for("doomed", cache_timeout_s=2.0, grace_s=1.0)
    sessions = node.servers.sessions
    cache.p.send_signal(signal.SIGSTOP)
    await node.announce("doomed")
    await attaching(sessions, "doomed")

    def read() -> subprocess.CompletedProcess[str]:
        return run("qemu-io", "-f", "raw", "-c", "read 0 4k", f"{uri}/doomed", check=False)

    client = asyncio.create_task(asyncio.to_thread(read))
    cache.kill9()  # the open never gets an answer: it times out (2 s here), then no responders
    first = await client
    assert first.returncode != 0 and "error" in first.stdout + first.stderr, first
    assert "doomed" not in sessions.sessions
    assert any("cannot attach session" in r.getMessage() for r in caplog.records)
    # The next connection opens the session itself and is refused with the reason.
    again = await asyncio.to_thread(read)
    assert again.returncode != 0
    assert "cache service" in again.stdout + again.stderr, again


async def test_an_announced_session_no_client_claims_is_dropped(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]],
) -> None:
    _cache, node, _uri = await node_for("never", wait_s=0.5)
    sessions = node.servers.sessions.sessions
    await node.announce("never")
    await wait_for(lambda: "never" in sessions, "the announced session to open")
    await wait_for(lambda: "never" not in sessions, "the unclaimed session to be dropped", 5)


async def test_a_malformed_announcement_is_logged_and_the_next_one_works(
    node_for: Callable[..., Awaitable[tuple[Proc, Node, str]]],
    nc: nats.NATS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _cache, node, _uri = await node_for("after")
    caplog.set_level(logging.WARNING, logger="streamboot.stream.announce")
    for junk in (b"not json", b'{"token": "x"}', b'{"token": 5, "session_id": "s"}', b"[]"):
        await nc.publish(prepare_subject(NODE), junk)
    await node.announce("after")
    sessions = node.servers.sessions.sessions
    await wait_for(lambda: "after" in sessions, "the well-formed announcement to open its session")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4, warnings
    assert all("malformed session announcement" in w for w in warnings)
    assert list(sessions) == ["after"]
