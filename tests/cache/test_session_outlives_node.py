"""A session outlives the restart of its stream node (issue 21 item 4, the sweeper part).

A client writes and flushes, goes quiet, and its stream node is killed (kill -9) and started
again: the registry's sweeper must not close the session for that (with the ``discard``
policy the close drops the write cache). The client reconnects to the restarted node and
reads its writes back. Real registry, cache service, stream service processes, qemu-io."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared import bus
from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc, System, qemu_io
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401
from tests.registry.test_sessions import MAC, seed

pytestmark = pytest.mark.timeout(240)
NODE = "stream-phoenix"


def start_stream(s: System, reg: Registry, nbd_port: int, log_name: str) -> Proc:
    env = {
        **s.env,
        **s.bus.env("stream"),
        "STREAMBOOT_DATA_DIR": str(reg.data_dir),  # the registry's vdisk dir
        "STREAMBOOT_NODE_ID": NODE,
        "STREAMBOOT_NBD_PORT": str(nbd_port),
        "STREAMBOOT_HTTP_STREAM_PORT": str(free_port()),
    }
    proc = Proc([sys.executable, "-m", "services.stream"], env, s.root / log_name)
    s.procs.append(proc)
    return proc


async def alive_since(reg: Registry, after: float = 0.0) -> float:
    """The start time of the node's instance heartbeating now, once one started after
    ``after`` is seen."""
    for _ in range(600):
        nodes = await reg.app._alive_stream_nodes() or {}
        if nodes.get(NODE, 0.0) > after:
            return nodes[NODE]
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream node {NODE} never heartbeat (after {after})")


async def open_on_one_node(
    reg: Registry, s: System, client: Any, log: str
) -> tuple[Proc, int, dict[str, Any]]:
    """The seeded device's session opened on one stream node (its own port, heartbeating)
    beside the system's cache service: the node's process, its port, the open's answer."""
    await seed(reg, reg.data_dir, MAC)
    await s.start_cache()
    port = free_port()
    node = start_stream(s, reg, port, log)
    await alive_since(reg)
    opened = await bus.request_json(client, "streamboot.registry.session.open", {"mac": MAC})
    return node, port, opened


async def test_a_quiet_session_survives_its_stream_node_restart(
    registry: Registry,  # noqa: F811 (the fixture)
    system: Callable[..., System],
    nc: Any,  # noqa: F811 (the fixture)
) -> None:
    s = system()
    first, port, opened = await open_on_one_node(registry, s, nc, "stream-1.log")
    sid, uri = opened["session_id"], opened["nbd_uri"]
    assert uri.startswith(f"nbd://127.0.0.1:{port}/")

    # A client that stays connected: it writes, flushes, then is quiet.
    client = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", "-c", "sleep 600000",
        uri, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(600):
        caches = (await s.stats())["write_caches"]
        await registry.app.catch_up()
        live = registry.app.projection.sessions[sid]
        if caches and caches[0]["used"] >= 65536 and live["attached"]:
            break
        await asyncio.sleep(0.05)
    assert [c["session_id"] for c in caches] == [sid] and live["attached"] == 1
    attached_at = registry.app.projection.sessions[sid]["attached_at"][NODE]

    # The node dies under its client and comes back; the client is away meanwhile.
    first.kill9()
    client.kill()
    await client.wait()
    start_stream(s, registry, port, "stream-2.log")
    await alive_since(registry, after=attached_at)

    # Quiet for longer than the detach grace, far less than the idle timeout: kept.
    grace = registry.settings.session_detach_grace_s
    assert grace * 4 < registry.settings.session_idle_timeout_s
    assert await registry.app.sweep(now=time.time() + 2 * grace) == []
    assert sid in registry.app.projection.sessions

    # The client comes back to the restarted node and finds its writes.
    await asyncio.to_thread(qemu_io, uri, "read -P 0x5a 0 64k", "read -P 0 64k 64k")
