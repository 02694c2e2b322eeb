"""After a request the stream node's loop keeps polling for a short window instead of
sleeping, while few connections are open (services/stream/busy_poll.py).

The machine running the tests may be busy, which turns polling off (tests/unit/
test_busy_poll.py): here every poll is told a CPU is idle, to test the window and the cap."""

from __future__ import annotations

import asyncio
import socket

import pytest

from services.stream.busy_poll import MAX_CONNECTIONS, BusyPoll
from tests.conftest import wait_for
from tests.stream.conftest import ServerThread
from tests.stream.test_clients import qemu_io


async def test_a_request_keeps_the_loop_turning_for_the_window_then_it_sleeps() -> None:
    poll = BusyPoll(0.05, connections=set(), idle=cpu_free)
    poll.touch(asyncio.get_running_loop())
    assert poll.spinning
    await wait_for(lambda: not poll.spinning, "the polling stopped after its window")
    # Nothing else was scheduled: every turn of the loop was the poll's own.
    turns = poll.turns
    assert turns > 1
    await asyncio.sleep(0.05)
    assert poll.turns == turns  # asleep: no more turns


async def test_a_window_of_zero_turns_it_off() -> None:
    poll = BusyPoll(0.0, connections=set(), idle=cpu_free)
    poll.touch(asyncio.get_running_loop())
    await asyncio.sleep(0.01)
    assert not poll.spinning and poll.turns == 0


async def test_with_many_connections_nothing_polls() -> None:
    loop = asyncio.get_running_loop()
    connections: set[int] = set(range(MAX_CONNECTIONS))
    poll = BusyPoll(10.0, connections, idle=cpu_free)
    poll.touch(loop)
    assert not poll.spinning

    connections.clear()  # a quiet node polls...
    poll.touch(loop)
    assert poll.spinning
    connections.update(range(MAX_CONNECTIONS))  # ...until a storm begins, window or not
    await wait_for(lambda: not poll.spinning, "the polling stopped when the node got busy")


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:  # type: ignore[no-untyped-def]
    server = make_server()  # busy polling as configured by default
    server.servers.sessions.busy_poll.idle = cpu_free
    return server


def cpu_free() -> bool:
    return True


def turns(server: ServerThread) -> int:
    """The node's polling turns so far, once its last window has ended."""
    poll = server.servers.sessions.busy_poll
    server.wait_until(lambda: not poll.spinning, "the node never stopped polling")
    return int(server.call(lambda: poll.turns))


def test_a_real_clients_requests_make_the_node_poll(server: ServerThread) -> None:
    assert server.settings.busy_poll_s > 0
    before = turns(server)
    qemu_io(f"{server.nbd}/tok-ro", "read 0 1M", read_only=True)
    assert turns(server) > before


def test_a_node_with_many_connections_does_not_poll(server: ServerThread) -> None:
    before = turns(server)
    port = server.servers.nbd_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        server.wait_until(
            lambda: len(server.servers.sessions.connections) >= MAX_CONNECTIONS,
            "the idle connections were not accepted",
        )
        qemu_io(f"{server.nbd}/tok-ro", "read 0 1M", read_only=True)
        assert turns(server) == before
    finally:
        for s in idle:
            s.close()
    server.wait_idle()
    qemu_io(f"{server.nbd}/tok-ro", "read 0 1M", read_only=True)  # quiet again: it polls
    assert turns(server) > before
