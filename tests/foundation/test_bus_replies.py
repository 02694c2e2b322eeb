"""Answers over the real nats-server (shared/bus.py serve_json / request_json): one too big
for a NATS message is an error the caller reads at once, not a timeout; one due after the
service's client reconnected is dropped, not refused by the server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest

from shared import bus
from shared.bus import RemoteError, ServiceUnavailable, request_json, serve_json
from shared.contracts.cache.wire import STATS
from tests.conftest import BusServer


async def test_an_answer_too_big_for_nats_is_an_error_not_a_timeout(nats_url: str) -> None:
    server = await nats.connect(nats_url)
    client = await nats.connect(nats_url)
    try:

        async def handler(body: dict[str, Any], _msg: object) -> dict[str, Any]:
            return {"blob": "x" * body["n"]}

        await serve_json(server, "test.big", handler)
        await server.flush()
        # The service answers a small request first: its subscription is live on the server.
        for _ in range(100):
            try:
                assert await request_json(client, "test.big", {"n": 3}) == {"blob": "xxx"}
                break
            except ServiceUnavailable:
                await asyncio.sleep(0.05)
        limit = server.max_payload
        with pytest.raises(RemoteError) as err:
            # 60 s: a reply that never came would show as a timeout, not as this error.
            await request_json(client, "test.big", {"n": limit + 1}, timeout_s=60)
        assert err.value.kind == "too_big"
        assert "test.big" in str(err.value) and str(limit) in str(err.value)
        # The service goes on answering.
        assert await request_json(client, "test.big", {"n": 3}) == {"blob": "xxx"}
    finally:
        await server.close()
        await client.close()


async def test_a_reply_after_the_connection_was_made_again_is_dropped_not_refused(
    nats_server: BusServer,
) -> None:
    """A request delivered on one connection and answered after the service's client
    reconnected (NATS restarted, the link dropped) reaches a connection that was never given
    the right to answer it: the server would log a permission violation. The answer is
    dropped; the requester asks again and is answered."""
    reconnected = asyncio.Event()
    service = await bus.connect(
        nats_server.url,
        "cache-replies",
        credentials=nats_server.credentials("cache"),
        on_reconnect=reconnected.set,
    )
    client = await nats.connect(nats_server.url_for("test"))
    entered, go = asyncio.Event(), asyncio.Event()

    async def handler(_body: Any, _msg: object) -> dict[str, Any]:
        entered.set()
        await go.wait()
        return {"late": True}

    try:
        await serve_json(service, STATS, handler, concurrent=True)  # a subject cache answers
        await service.flush()
        first = asyncio.create_task(client.request(STATS, b"{}", timeout=3))
        await asyncio.wait_for(entered.wait(), 30)
        service._transport._io_writer.transport.abort()  # type: ignore[union-attr]
        await asyncio.wait_for(reconnected.wait(), 30)
        go.set()
        with pytest.raises(nats.errors.TimeoutError):
            await first
        for _ in range(100):  # the service's subscription may be on its way back
            try:
                again = await client.request(STATS, b"{}", timeout=30)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        assert json.loads(again.data) == {"late": True}
        await service.flush()
        await asyncio.sleep(0.5)  # the server logs a refused publish (checked at teardown)
    finally:
        await service.close()
        await client.close()
