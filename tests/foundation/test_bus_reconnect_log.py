"""What a service says about its NATS connection through an outage (shared/bus.py), against a
real nats-server stopped and started again."""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest

from shared import bus
from streamboot.embedded.nats import EmbeddedNats
from streamboot.embedded.proc import free_port
from tests.conftest import traversable_tmpdir, wait_for


async def test_an_outage_is_logged_once_with_its_length_not_at_every_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = traversable_tmpdir("streamboot-test-outage-")
    server = EmbeddedNats(root / "nats", port=free_port())
    await server.start(log_path=root / "nats.log")
    reconnects: list[int] = []
    nc = await bus.connect(server.url, "probe", on_reconnect=lambda: reconnects.append(1))
    caplog.set_level(logging.WARNING, logger="streamboot.bus")
    try:
        await server.stop()

        def lines(text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if text in r.getMessage()]

        await wait_for(lambda: bool(lines("disconnected from NATS")), "the disconnect", 20)
        await wait_for(lambda: bool(lines("unreachable")), "the first failed reconnect", 20)
        await asyncio.sleep(6 * bus.RECONNECT_WAIT_S)  # several more failed reconnects
        unreachable = lines("unreachable")
        assert len(unreachable) == 1, unreachable  # not one line per attempt
        assert "1 failed reconnects" in unreachable[0] and server.url in unreachable[0]
        assert len(lines("NATS error")) <= 1  # the loss itself (an EOF), not each retry

        await server.start(log_path=root / "nats.log")  # same port: nats-py finds it
        await wait_for(lambda: bool(reconnects), "the reconnection", 20)
        (back,) = lines("reconnected to NATS")
        failed = int(back.split("(")[1].split()[0])
        assert failed >= 3, back  # the attempts the outage cost, counted not logged
        await nc.publish("probe.after", b"x")
        await nc.flush()
    finally:
        await nc.close()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)
