"""A maintenance session end to end: the registry, a real stream node and a real cache
service (subprocesses), a real NBD client writing, then `streamboot vdisk commit` turning
the kept writes into the next version."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.vdisk_layout import open_chain
from streamboot.embedded.proc import free_port
from tests.registry.conftest import Registry, write_image

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) missing"),
]
MAC = "52:54:00:00:00:77"
MiB = 1 << 20


@contextlib.asynccontextmanager
async def service(name: str, env: dict[str, str], log: Path) -> AsyncIterator[None]:
    out = await asyncio.to_thread(open, log, "wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{name}", env=env, stdout=out, stderr=out
    )
    out.close()
    try:
        yield
    except BaseException:
        text = await asyncio.to_thread(log.read_text, errors="replace")
        print(f"--- {name} log ---\n" + text[-6000:])
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def service_env(registry: Registry, node: str, **settings: str) -> dict[str, str]:
    """The environment of a stream or cache service of this test, on the registry's NATS
    and data dir, on free ports (``settings``: more STREAMBOOT_ settings); a service adds
    its own role's NATS user (``registry.bus.env(role)``)."""
    dd = registry.data_dir
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")},
        "STREAMBOOT_NATS_URL": registry.bus.url,
        "STREAMBOOT_DATA_DIR": str(dd),
        "STREAMBOOT_NODE_ID": node,
        "STREAMBOOT_NBD_PORT": str(free_port()),
        "STREAMBOOT_HTTP_STREAM_PORT": str(free_port()),
        # Not the default 13260: a test running beside this one may hold it.
        "STREAMBOOT_ISCSI_PORT": str(free_port()),
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_CACHE_RAM_DIR": str(dd / "ram"),
        "STREAMBOOT_HEARTBEAT_INTERVAL_S": "0.5",
        **{f"STREAMBOOT_{k.upper()}": v for k, v in settings.items()},
    }


@contextlib.asynccontextmanager
async def data_plane(registry: Registry, node: str) -> AsyncIterator[None]:
    """A cache service and a stream node of this test (subprocesses), seen alive by the
    registry."""
    dd = registry.data_dir
    env = service_env(registry, node)
    async with (
        service("cache", {**env, **registry.bus.env("cache")}, dd / "cache.log"),
        service("stream", {**env, **registry.bus.env("stream")}, dd / "stream.log"),
    ):
        # As the registry sees them: its view is a watch, a moment behind the bucket.
        await registry.sees("cache", node, timeout_s=20.0)
        await registry.sees("stream", node, timeout_s=20.0)
        yield


async def qemu_io(uri: str, *commands: str) -> None:
    """Real qemu-io runs ``commands`` on the NBD export at ``uri`` (one connection)."""
    args = [x for c in commands for x in ("-c", c)]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", *args, uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()


async def provision(registry: Registry, mac: str, hostname: str, vdisk: str, image: Path) -> None:
    """``image`` imported as ``vdisk``, the default of a new device (the real CLI)."""
    await registry.cli_json("vdisk", "import", str(image), "--name", vdisk)
    await registry.cli_json("device", "add", mac, "--hostname", hostname)
    await registry.cli_json("assign", mac, vdisk, "--default")


def read_chain(layers: list[str], offset: int, length: int) -> bytes:
    with open_chain(layers) as chain:
        return chain.pread(offset, length)


async def test_maintenance_writes_become_the_next_version(registry: Registry, nc: Any) -> None:
    node = f"stream-maint-{os.getpid()}"
    image = write_image(registry.data_dir / "base.raw", 4 * MiB, {0: b"MBR", 2 * MiB: b"old data"})
    await registry.cli_json("vdisk", "import", str(image), "--name", "win")
    async with registry.http() as http:
        assert (await http.post("/devices", json={"mac": MAC})).is_success
        assert (await http.post("/assignments", json={"target": MAC, "vdisk": "win"})).is_success
        async with data_plane(registry, node):
            r = await http.post("/sessions", json={"mac": MAC, "maintenance": True})
            assert r.status_code == 201, r.text
            s = r.json()
            assert s["version"] == 1 and s["stream_node"] == node and s["writes_to_vdisk"]
            assert s["write_cache"] == "server-disk" and s["write_cache_persistence"] == "keep"
            code, _, err = await registry.cli("vdisk", "commit", "win")
            assert code == 1 and "still in maintenance by live session" in err
            qemu_io = await asyncio.create_subprocess_exec(
                "qemu-io", "-f", "raw", "-c", f"write -P 0xab {2 * MiB} 64k",
                "-c", f"write -z {3 * MiB} 4k", s["nbd_uri"],
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(qemu_io.communicate(), 60)
            assert qemu_io.returncode == 0, out.decode()
            r = await http.delete(f"/sessions/{s['token']}")
            assert r.is_success, r.text
            committed = await registry.cli_json("vdisk", "commit", "win")
    v2 = committed["version"]
    assert v2["version"] == 2 and v2["parent"] == 1 and v2["stage"] == "maintenance"
    assert v2["changed_blocks"] == 1  # one 64 KiB delta block: the written range
    layers = committed["latest_layers"]
    assert read_chain(layers, 2 * MiB, 64 * 1024) == b"\xab" * 64 * 1024
    assert read_chain(layers, 0, 3) == b"MBR"
    assert read_chain(layers, 3 * MiB, 4096) == bytes(4096)
    # Committed: there is nothing left to commit.
    code, _, err = await registry.cli("vdisk", "commit", "win")
    assert code == 1 and "no finished maintenance session" in err
