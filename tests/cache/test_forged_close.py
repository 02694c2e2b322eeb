"""A SessionClosed that is not in the log destroys nothing (issue 21 item 2).

Anyone who can publish on ``events.SessionClosed.>`` used to make the stream node drop a
live session and the cache service delete its write cache: the client came back to golden
bytes where its flushed writes were. Now both confirm the close with the registry (it reads
the log) first. Real registry, cache service (its own process), stream service (in this
loop, reading through the registry) and qemu-io over NBD."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from services.cache.event_followers import CLOSED_FETCH_WAIT_S, CLOSED_RETRY_S
from services.stream.service import start as start_stream
from shared import bus
from shared.event_log import CLOSED_CONFIRM_TIMEOUT_S
from shared.service import ServiceRuntime
from shared.settings import Settings
from tests.cache.conftest import System, qemu_io
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401
from tests.registry.test_sessions import MAC, seed

pytestmark = pytest.mark.timeout(180)
NODE = "stream-forged"


async def start_stream_node(reg: Registry, nats_url: str) -> ServiceRuntime:
    settings = Settings(
        data_dir=reg.data_dir,
        nats_url=nats_url,
        node_id=NODE,
        nbd_port=0,
        http_stream_port=0,
        iscsi_port=0,  # not the default port: another server on this machine may hold it
    )
    rt = ServiceRuntime("stream", settings)
    await rt.connect()
    await start_stream(rt)
    return rt


@pytest.fixture
async def stream_node(
    registry: Registry,  # noqa: F811 (the fixture)
    nats_url: str,
) -> AsyncIterator[list[ServiceRuntime]]:
    """The stream service's instances, the last one running (a test may restart it)."""
    nodes = [await start_stream_node(registry, nats_url)]
    try:
        yield nodes
    finally:
        await nodes[-1].stop()


def nbd_uri(rt: ServiceRuntime, token: str) -> str:
    return f"nbd://{rt.vitals()['nbd']}/{token}"  # type: ignore[operator]


# The cache service takes a SessionClosed only once the registry confirms it; an answer
# that does not come in time puts the event back for a retry. Three such rounds on a loaded
# machine, and the pull that picks it up.
CACHE_CONFIRM_S = 3 * (CLOSED_CONFIRM_TIMEOUT_S + CLOSED_RETRY_S) + CLOSED_FETCH_WAIT_S


async def until(check: Callable[[], Any], what: str, within_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never within {within_s:.0f} s: {what}")


async def test_a_forged_session_closed_keeps_the_write_cache_of_a_live_session(
    registry: Registry,  # noqa: F811 (the fixture)
    system: Callable[..., System],
    stream_node: list[ServiceRuntime],
    nc: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streamboot.stream")
    await seed(registry, registry.data_dir, MAC)
    s = system()
    await s.start_cache()
    opened = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    sid, token = opened["session_id"], opened["token"]
    uri = nbd_uri(stream_node[-1], token)
    await asyncio.to_thread(qemu_io, uri, "write -P 0x5a 0 64k", "flush")
    caches = (await s.stats())["write_caches"]
    assert [c["session_id"] for c in caches] == [sid] and caches[0]["used"] > 0

    # The forgery: a well-formed SessionClosed, published raw where the relay publishes.
    forged = {
        "id": str(uuid.uuid4()), "type": "SessionClosed", "stream_id": f"session-{sid}",
        "version": 99, "time": "2026-01-01T00:00:00Z",
        "data": {"session_id": sid, "reason": "forged"},
    }  # fmt: skip
    js = nc.jetstream()
    ack = await js.publish("events.SessionClosed.session", json.dumps(forged).encode())

    async def cache_consumed() -> bool:
        # The consumer takes SessionClosed only: its delivered position stops at the
        # forgery's own sequence, never at the later events of other types.
        durable = f"cache-closed-{bus.subject_token(s.node_id())}"
        info = await js.consumer_info(bus.EVENTS_STREAM, durable)
        return info.delivered.stream_seq >= ack.seq and not info.num_ack_pending

    await until(cache_consumed, "the cache service took the forged SessionClosed", CACHE_CONFIRM_S)

    async def stream_saw_it() -> bool:
        # Ignored (the log has no such close), or acted upon (it dropped the session).
        return any(
            line in caplog.text
            for line in ("a SessionClosed that is not in the log", "state dropped")
        )

    await until(stream_saw_it, "the stream node saw the forged SessionClosed")

    # Nothing was destroyed: the registry, the cache and the stream node still hold it.
    assert [x["session_id"] for x in registry.app.list_sessions()] == [sid]
    caches = (await s.stats())["write_caches"]
    assert [c["session_id"] for c in caches] == [sid] and caches[0]["used"] > 0
    # A new stream instance (nothing of the session in its memory) reads the writes back
    # from the cache service.
    await stream_node[-1].stop()
    stream_node.append(await start_stream_node(registry, s.nats_url))
    await asyncio.to_thread(
        qemu_io, nbd_uri(stream_node[-1], token), "read -P 0x5a 0 64k", "read -P 0 64k 4k"
    )

    # A real close (in the log) still drops the cache.
    await bus.request_json(nc, "streamboot.registry.session.close", {"session_id": sid})

    async def dropped() -> bool:
        return not (await s.stats())["write_caches"]

    await until(dropped, "the closed session's write cache was dropped", CACHE_CONFIRM_S)
