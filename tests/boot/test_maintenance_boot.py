"""Maintenance through PXE, end to end on real parts: `streamboot device maintenance MAC on`,
the device's iPXE script opens a read-write maintenance session (kernel-direct, one-time
nonce redeemed with curl), a real NBD client (qemu-io) writes through the real stream node
into the real cache service, a second device in maintenance is refused on its screen, the
commit of a running session is refused, and after the client leaves `vdisk commit`
publishes the writes (kernels found again), `promote` to test then production."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from typing import Any

import pytest

from shared.vdisk_layout import open_chain
from tests.boot.test_service import Boot, boot  # noqa: F401 (the boot service fixture)
from tests.conftest import wait_for
from tests.registry.conftest import Registry, write_bootable_image
from tests.registry.test_maintenance import data_plane

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) missing"),
]
MAINT = "52:54:00:00:0a:01"
OTHER = "52:54:00:00:0a:02"
PLAIN = "52:54:00:00:0a:03"
MiB = 1 << 20
# Past the image's ext4 filesystem (1 MiB .. 21 MiB): the kernel scan still finds its files.
MARK_AT = 22 * MiB


async def curl(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode() + out.decode()
    return out.decode()


async def types_in_log(registry: Registry) -> list[str]:
    return [e.type for e in await registry.app.store.read_all()]


async def test_a_device_in_maintenance_pxe_boots_read_write_and_its_writes_are_committed(
    boot: Boot,  # noqa: F811
    registry: Registry,
    nc: Any,
) -> None:
    dd = registry.data_dir
    image = write_bootable_image(dd / "debian.raw")
    await registry.cli_json("vdisk", "import", str(image), "--name", "deb")
    async with registry.http() as http:
        for mac in (MAINT, OTHER, PLAIN):
            assert (await http.post("/devices", json={"mac": mac})).status_code == 201
            body = {"target": mac, "vdisk": "deb", "default": True}
            assert (await http.post("/assignments", json=body)).is_success

    # Bad input first: an unknown state, a device without a vdisk.
    code, _, err = await registry.cli("device", "maintenance", MAINT, "maybe")
    assert code != 0 and "on or off" in err
    on = await registry.cli_json("device", "maintenance", MAINT, "on")
    assert on["maintenance"] is True and on["maintenance_vdisk"] == "deb"

    async with data_plane(registry, f"stream-pxe-maint-{os.getpid()}"):
        # The device in maintenance: a kernel-direct boot of the latest version, read-write.
        script = await boot.script(mac=MAINT)
        assert "kernel " in script and "streamboot.wc=server-disk" in script, script
        assert "menu" not in script
        nonce = re.search(r"streamboot\.nonce=([A-Za-z0-9_-]+)", script)
        assert nonce is not None, script
        [s] = registry.app.list_sessions()
        assert s["mac"] == MAINT and s["maintenance"] and s["writes_to_vdisk"]
        assert s["version"] == 1 and not s["read_only"]
        assert s["write_cache"] == "server-disk" and s["write_cache_persistence"] == "keep"

        # A second device in maintenance on the same vdisk: refused, on its screen.
        await registry.cli_json("device", "maintenance", OTHER, "on")
        refused = await boot.script(mac=OTHER)
        assert "kernel " not in refused and "sanboot" not in refused
        assert f"in maintenance by device {MAINT}" in refused and "one device at a time" in refused
        assert len(registry.app.list_sessions()) == 1
        # ...and in the CLI, for a session opened by hand.
        code, _, err = await registry.cli("session", "open", OTHER, "--maintenance")
        assert code != 0 and f"in maintenance by device {MAINT}" in err, err
        await registry.cli_json("device", "maintenance", OTHER, "off")

        # A commit while the client still runs: refused, nothing published.
        code, _, err = await registry.cli("vdisk", "commit", "deb")
        assert code == 1 and "still in maintenance by live session" in err

        # The initramfs's redeem (curl from the address the script went to), then the OS
        # writes through the export it got.
        answer = dict(
            line.split("=", 1)
            for line in (await curl(f"{boot.url}/session/redeem?nonce={nonce.group(1)}")).split()
        )
        uri = f"nbd://{answer['nbd_host']}:{answer['nbd_port']}/{answer['export']}"
        qemu_io = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", f"write -P 0x5a {MARK_AT} 128k", uri,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(qemu_io.communicate(), 60)
        assert qemu_io.returncode == 0, out.decode()

        # The client shut down: its detach reaches the log, the sweeper closes the session.
        async def detached() -> bool:
            return "SessionDetached" in await types_in_log(registry)

        await wait_for(detached, "the session's SessionDetached in the log", timeout_s=60)
        grace = registry.settings.session_detach_grace_s
        assert await registry.app.sweep(now=time.time() + grace + 1) == [s["session_id"]]

        committed = await registry.cli_json("vdisk", "commit", "deb")
    v2 = committed["version"]
    assert v2["version"] == 2 and v2["stage"] == "maintenance"
    # Kernel discovery ran on the committed image, as for an import.
    assert v2["boot"]["kernel_version"] == "6.1.0-12-amd64"
    with open_chain(committed["latest_layers"]) as chain:
        assert chain.pread(MARK_AT, 128 * 1024) == b"\x5a" * 128 * 1024
        assert chain.pread(MARK_AT + 128 * 1024, 4096) == bytes(4096)

    # Everyone else still boots version 1 until the promotions.
    await registry.cli_json("device", "maintenance", MAINT, "off")
    assert "/boot-files/deb/1/" in await boot.script(mac=PLAIN)
    await registry.cli_json("session", "close", registry.app.list_sessions()[0]["session_id"])
    await registry.cli_json("vdisk", "promote", "deb", "2", "--to", "test")
    await registry.cli_json("device", "update", PLAIN, "--tester")
    assert "/boot-files/deb/2/" in await boot.script(mac=PLAIN)  # a tester takes the test
    await registry.cli_json("session", "close", registry.app.list_sessions()[0]["session_id"])
    await registry.cli_json("device", "update", PLAIN, "--no-tester")
    await registry.cli_json("vdisk", "promote", "deb", "2", "--to", "production")
    assert "/boot-files/deb/2/" in await boot.script(mac=PLAIN)
    await registry.cli_json("session", "close", registry.app.list_sessions()[0]["session_id"])
    rolled = await registry.cli_json("vdisk", "rollback", "deb")
    assert rolled["production_version"] == 1

    log = await registry.app.store.read_all()
    maint = [e.data for e in log if e.type == "DeviceMaintenanceChanged"]
    assert [(d["mac"], d["maintenance"]) for d in maint] == [
        (MAINT, True), (OTHER, True), (OTHER, False), (MAINT, False),
    ]  # fmt: skip
    opened = [e.data for e in log if e.type == "SessionOpened" and e.data["maintenance"]]
    assert [d["mac"] for d in opened] == [MAINT]
    assert any(e.type == "SessionConflictRejected" and e.data["mac"] == OTHER for e in log)
    stages = [(e.data["version"], e.data["stage"]) for e in log if e.type == "VdiskVersionPromoted"]
    assert stages == [(2, "test"), (2, "production")]
    assert [e.type for e in log if e.type == "VdiskRolledBack"] == ["VdiskRolledBack"]
