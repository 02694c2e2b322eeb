"""shared/bus.py Requests (the data plane's request/reply) over a real nats-server: each
answer reaches its own caller, in whatever order they come; no responder and no answer are
the same errors as nats-py's ``request``; nothing is left pending."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared.bus import Requests


async def test_requests_get_their_own_answers_and_the_same_errors_as_nats_py(
    nats_url: str,
) -> None:
    subject = f"test.requests.{uuid.uuid4().hex}"
    server = await nats.connect(nats_url)
    client = await nats.connect(nats_url)
    try:

        async def answer_later(msg: Msg) -> None:
            # The first request is answered last: replies do not come in request order.
            n = int(msg.data)
            await asyncio.sleep(0.01 * (5 - n))
            await msg.respond(b"re:" + msg.data)

        async def spawn(msg: Msg) -> None:
            asyncio.get_running_loop().create_task(answer_later(msg))

        await server.subscribe(subject, cb=spawn)

        async def ignore(_msg: Msg) -> None:
            return None

        await server.subscribe(f"{subject}.silent", cb=ignore)
        await server.flush()
        requests = Requests(client)

        replies = await asyncio.gather(
            *(requests.request(subject, str(n).encode(), 5) for n in range(5))
        )
        assert [m.data for m in replies] == [f"re:{n}".encode() for n in range(5)]

        with pytest.raises(NoRespondersError):
            await requests.request(f"{subject}.nobody", b"x", 5)
        with pytest.raises(NatsTimeoutError):
            await requests.request(f"{subject}.silent", b"x", 0.2)
        assert requests._pending == {}
        # Still usable after both.
        assert (await requests.request(subject, b"4", 5)).data == b"re:4"
    finally:
        await server.close()
        await client.close()
