"""A closed RawTransport connection is freed at once (issue 26, memory under a flood of
connections): its protocol holds the transport, so while the transport held its protocol
every closed connection waited for the cyclic garbage collector, and a flood of connections
shed by the handshake total piled up thousands of them (tests/integration/
test_hostile_memory.py shows the process's memory)."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

from services.stream.rawtransport import RawTransport


class Holder(asyncio.Protocol):
    """Holds its transport, as the stream node's connections do."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    gc.disable()
    try:
        protocol = Holder()
        transport = RawTransport(loop, ours, protocol)
        await asyncio.sleep(0)  # connection_made
        assert protocol.transport is transport
        lost = protocol.lost
        gone = weakref.ref(protocol), weakref.ref(transport)
        transport.abort()
        await lost
        del protocol, transport
        assert gone[0]() is None and gone[1]() is None
    finally:
        gc.enable()
        peer.close()
