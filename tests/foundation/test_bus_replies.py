"""Answers over the real nats-server (shared/bus.py serve_json / request_json): one too big
for a NATS message is an error the caller reads at once, not a timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest

from shared.bus import RemoteError, ServiceUnavailable, request_json, serve_json


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
