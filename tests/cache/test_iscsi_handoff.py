"""The iSCSI hand-off of a SAN boot (docs/iscsi.md, "The hand-off"): iPXE logs in to the
session's target and never logs out (and logs in again whenever its connection is dropped
under it); the OS's own initiator logs in later from the iBFT, with the same initiator
name. The OS must find the same session and its write cache however long after iPXE's
connection died it comes.

Real registry (in-process, its sweeper driven with explicit times), cache service and
stream service processes. The OS is QEMU's iSCSI initiator (qemu-io over libiscsi); iPXE is
played by the raw initiator of tests/stream/iscsiraw.py sending iPXE's ISID (no tool but
iPXE itself sends it; the real iPXE is tests/e2e/test_realos_iscsi.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest

from services.registry.domain.sessions import awaiting_handoff
from services.stream.iscsi.server import IPXE_ISID
from shared import bus
from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc, System, run
from tests.cache.test_session_outlives_node import alive_since
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401
from tests.registry.test_sessions import MAC, seed
from tests.stream.iscsiraw import RawIscsi

pytestmark = pytest.mark.timeout(240)
NODE = "stream-phoenix"  # the node alive_since() watches


def start_stream(s: System, reg: Registry, iscsi_port: int) -> Proc:
    env = {
        **s.env,
        **s.bus.env("stream"),
        "STREAMBOOT_DATA_DIR": str(reg.data_dir),  # the registry's vdisk dir
        "STREAMBOOT_NODE_ID": NODE,
        "STREAMBOOT_NBD_PORT": str(free_port()),
        "STREAMBOOT_HTTP_STREAM_PORT": str(free_port()),
        "STREAMBOOT_ISCSI_PORT": str(iscsi_port),
        # The stream node drops the session's stack as soon as iPXE's connection is gone:
        # the OS's login opens it again and must find the write cache at the cache service.
        "STREAMBOOT_STREAM_SESSION_LINGER_S": "0",
    }
    proc = Proc([sys.executable, "-m", "services.stream"], env, s.root / "stream.log")
    s.procs.append(proc)
    return proc


def ipxe_login_and_vanish(opened: dict[str, Any], write: bool) -> None:
    """A login as iPXE makes it (its ISID, the device's initiator name), a 4 KiB write of
    0x5a at 0 if ``write``, then the connection reset without a logout."""
    c = RawIscsi(int(opened["iscsi_portal"].rsplit(":", 1)[1]))
    c.isid, c.initiator = IPXE_ISID + os.urandom(2), opened["initiator_iqn"]
    c.login(opened["iscsi_target"])
    if write:
        assert c.write10(0, b"\x5a" * 4096)[0] == 0
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def image_opts(opened: dict[str, Any]) -> str:
    """QEMU's iSCSI driver logging in as the device (its initiator name from the registry)."""
    return (
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.lun=0,"
        f"file.portal={opened['iscsi_portal']},file.target={opened['iscsi_target']},"
        f"file.initiator-name={opened['initiator_iqn']}"
    )


async def session_state(reg: Registry, sid: str, attaches: int, attached: int) -> dict[str, Any]:
    """The registry's record of ``sid`` once it shows ``attaches`` attachments in all,
    ``attached`` of them live (and, at 0, a detach time)."""
    for _ in range(600):
        await reg.app.catch_up()
        s = reg.app.projection.sessions[sid]
        if (s.get("attaches"), s["attached"]) == (attaches, attached) and (
            attached or s["detached_at"] is not None
        ):
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} never had {attaches}/{attached} attachment(s)")


async def test_the_os_login_finds_the_session_ipxe_left_long_after_its_connection_died(
    registry: Registry,  # noqa: F811 (the fixture)
    system: Callable[..., System],
    nc: Any,  # noqa: F811 (the fixture)
) -> None:
    await seed(registry, registry.data_dir, MAC)
    async with registry.http() as http:
        r = await http.patch("/vdisks/win", json={"boot_method": "sanboot-iscsi"})
        assert r.status_code == 200, r.text
    s = system()
    await s.start_cache()
    start_stream(s, registry, free_port())
    await alive_since(registry)
    opened = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
    sid = opened["session_id"]
    assert opened["initiator_iqn"] and opened["iscsi_target"]

    # iPXE: logs in as the device and writes; its connection is dropped, it logs in again,
    # and then vanishes without a logout (the OS started).
    for n, write in enumerate((True, False)):
        await asyncio.to_thread(ipxe_login_and_vanish, opened, write)
        left = await session_state(registry, sid, attaches=n + 1, attached=0)
    caches = (await s.stats())["write_caches"]
    assert [c["session_id"] for c in caches] == [sid] and caches[0]["used"] >= 4096
    assert awaiting_handoff(registry.app.projection, left)

    # Far past keepalive + the detach grace that would have closed it: still there.
    grace = registry.settings.session_detach_grace_s
    handoff = registry.settings.session_handoff_grace_s
    assert handoff > 4 * grace
    assert await registry.app.sweep(now=left["detached_at"] + 4 * grace) == []

    # The OS: the same initiator name, another ISID (libiscsi's own), reads iPXE's write.
    os_login = ["qemu-io", "--image-opts", image_opts(opened)]
    await asyncio.to_thread(run, *os_login, "-c", "read -P 0x5a 0 4k", "-c", "read -P 0 64k 4k")
    done = await session_state(registry, sid, attaches=3, attached=0)
    assert not awaiting_handoff(registry.app.projection, done)

    # Handed off: its client leaving now ends it after the usual grace.
    assert await registry.app.sweep(now=done["detached_at"] + grace) == [sid]
    [closed] = await registry.app.store.read_all(types=["SessionClosed"])
    assert closed.data["reason"] == "client-gone"
