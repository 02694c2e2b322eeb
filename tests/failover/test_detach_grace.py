"""The detach grace end to end: a client that comes back late, but within the grace, keeps
its session and its writes; one that comes back just after the grace is refused, and told
why. Real registry (its sweeper driven with explicit times), cache service, stream node
process; qemu-io as the NBD client (a starved guest's helper reattaches the
same way, with the session's token as the export name; docs/failover.md)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.cache.conftest import System, qemu_io
from tests.cache.test_session_outlives_node import open_on_one_node
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401

pytestmark = pytest.mark.timeout(180)
# The stream node's answer to a token with no live session (services/stream/sessions.py).
REFUSED = "no live session has this token"


async def detached_at(reg: Registry, sid: str, after: float = 0.0) -> float:
    """The registry's time of the session's detach, once one later than ``after`` is in."""
    for _ in range(600):
        await reg.app.catch_up()
        live = reg.app.projection.sessions[sid]
        if live["attached"] == 0 and (live["detached_at"] or 0.0) > after:
            return float(live["detached_at"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no detach of {sid} after {after}: {live}")


async def test_a_reattach_within_the_grace_keeps_the_session_one_after_it_is_refused(
    registry: Registry,  # noqa: F811 (the fixture)
    system: Callable[..., System],
    nc: Any,  # noqa: F811 (the fixture)
) -> None:
    _, _, opened = await open_on_one_node(registry, system(), nc, "stream.log")
    sid, uri = opened["session_id"], opened["nbd_uri"]
    grace = registry.settings.session_detach_grace_s

    # The client writes and goes (its connection ends: the node reports the detach).
    await asyncio.to_thread(qemu_io, uri, "write -P 0x5a 0 64k", "flush")
    gone = await detached_at(registry, sid)
    # The sweeper runs a moment before the grace ends: the session stays.
    assert await registry.app.sweep(now=gone + grace * 0.95) == []
    # The late client comes back with the same token: its session and its writes are there.
    await asyncio.to_thread(qemu_io, uri, "read -P 0x5a 0 64k", "read -P 0 64k 64k")

    # It goes again, and this time the sweeper runs at the grace's end: closed.
    again = await detached_at(registry, sid, after=gone)
    assert await registry.app.sweep(now=again + grace) == [sid]
    [closed] = [
        e for e in await registry.app.store.read_all(types=["SessionClosed"])
        if e.correlation_id == sid
    ]  # fmt: skip
    assert closed.data["reason"] == "client-gone"
    # A client coming back after that is refused, with the reason in the NBD reply's text
    # (qemu's NBD client prints it: "server reported: ..."). The node drops its copy when
    # the close reaches it over the bus: until then a connection may still get through.
    for _ in range(100):
        late = await asyncio.to_thread(
            subprocess.run, ["qemu-io", "-f", "raw", "-c", "read 0 4k", uri],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if REFUSED in late.stderr:
            break
        await asyncio.sleep(0.1)
    assert late.returncode != 0 and REFUSED in late.stderr, late
