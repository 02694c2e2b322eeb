"""The iSCSI hand-off of a SAN boot (docs/iscsi.md, "The hand-off"): iPXE logs in to the
session's target and never logs out; the OS's own initiator logs in again later from the
iBFT, with the same initiator name. The OS must find the same session and its write cache
however long after iPXE's connection died it comes.

Real registry (in-process, its sweeper driven with explicit times), cache service and
stream service processes; the initiators are QEMU's iSCSI driver (qemu-io over libiscsi)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from services.registry.domain.sessions import awaiting_handoff
from shared import bus
from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc, System, run
from tests.cache.test_session_outlives_node import alive_since
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401
from tests.registry.test_sessions import MAC, seed

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

    # iPXE: logs in as the device, writes, and vanishes without a logout.
    ipxe = await asyncio.create_subprocess_exec(
        "qemu-io", "--image-opts", image_opts(opened), "-c", "write -P 0x5a 0 64k",
        "-c", "flush", "-c", "sleep 600000", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await session_state(registry, sid, attaches=1, attached=1)
    for _ in range(600):  # its write is in the session's write cache
        caches = (await s.stats())["write_caches"]
        if caches and caches[0]["used"] >= 65536:
            break
        await asyncio.sleep(0.05)
    assert [c["session_id"] for c in caches] == [sid]
    ipxe.kill()
    await ipxe.wait()
    left = await session_state(registry, sid, attaches=1, attached=0)
    assert awaiting_handoff(registry.app.projection, left)

    # Far past keepalive + the detach grace that would have closed it: still there.
    grace = registry.settings.session_detach_grace_s
    handoff = registry.settings.session_handoff_grace_s
    assert handoff > 4 * grace
    assert await registry.app.sweep(now=left["detached_at"] + 4 * grace) == []

    # The OS: the same initiator name, another ISID (libiscsi's own), reads iPXE's write.
    os_login = ["qemu-io", "--image-opts", image_opts(opened)]
    await asyncio.to_thread(run, *os_login, "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 4k")
    done = await session_state(registry, sid, attaches=2, attached=0)
    assert not awaiting_handoff(registry.app.projection, done)

    # Handed off: its client leaving now ends it after the usual grace.
    assert await registry.app.sweep(now=done["detached_at"] + grace) == [sid]
    [closed] = await registry.app.store.read_all(types=["SessionClosed"])
    assert closed.data["reason"] == "client-gone"
