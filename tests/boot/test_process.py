"""`python -m services.boot` as its own process: its endpoints in `streamboot status --json`,
full DHCP leases in `streamboot dhcp leases --json`, kept across a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.boot import dhcp_packets as dp
from streamboot.embedded.proc import free_port
from tests.conftest import BusServer

pytestmark = pytest.mark.timeout(120)
PLAIN_DISCOVER = (Path(__file__).parent / "fixtures" / "udhcpc_plain_discover.bin").read_bytes()


def boot_env(bus: BusServer, data_dir: Path, dhcp_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")}
    env.update(
        bus.env("boot"),
        STREAMBOOT_DATA_DIR=str(data_dir),
        STREAMBOOT_NODE_ID="boot-process-test",
        STREAMBOOT_HEARTBEAT_INTERVAL_S="0.5",
        STREAMBOOT_BOOT_HTTP_PORT=str(free_port()),
        STREAMBOOT_TFTP_PORT=str(free_port()),
        STREAMBOOT_TFTP_ROOT=str(data_dir),
        STREAMBOOT_DHCP_MODE="full",
        STREAMBOOT_DHCP_PORT=str(dhcp_port),
        STREAMBOOT_DHCP_POOL_START="10.213.1.10",
        STREAMBOOT_DHCP_POOL_END="10.213.1.20",
    )
    return env


async def cli(env: dict[str, str], *args: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from streamboot.cli import main; main()", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out or b"null")


async def lease_cycle(port: int, mac: bytes) -> dp.DhcpPacket:
    """DISCOVER then REQUEST the offered address; returns the ACK."""

    def go() -> dp.DhcpPacket:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            discover = dp.parse(PLAIN_DISCOVER)
            discover.chaddr = mac
            for _ in range(20):  # the server may still be starting
                sock.sendto(dp.build(discover), ("127.0.0.1", port))
                try:
                    offer = dp.parse(sock.recv(2048))
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("no DHCP offer")
            request = dp.parse(PLAIN_DISCOVER)
            request.chaddr = mac
            request.options[dp.OPT_MESSAGE_TYPE] = bytes((dp.REQUEST,))
            request.options[dp.OPT_REQUESTED_IP] = dp.ip_bytes(offer.yiaddr)
            request.options[dp.OPT_SERVER_ID] = offer.options[dp.OPT_SERVER_ID]
            sock.sendto(dp.build(request), ("127.0.0.1", port))
            return dp.parse(sock.recv(2048))

    return await asyncio.to_thread(go)


async def run_boot(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.boot", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def stop(proc: asyncio.subprocess.Process) -> bytes:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return err


async def test_status_endpoints_and_leases_across_restart(
    nats_url: str, nats_server: BusServer, tmp_path: Path
) -> None:
    dhcp_port = free_port()
    env = boot_env(nats_server, tmp_path, dhcp_port)
    mac = bytes.fromhex("525400c0ffee")
    proc = await run_boot(env)
    try:
        ack = await lease_cycle(dhcp_port, mac)
        assert ack.message_type == dp.ACK and ack.yiaddr == "10.213.1.10"
        for _ in range(100):
            _, status = await cli(env, "status", "--json")
            if status["services"]["boot"]["alive"] and "tftp" in status["endpoints"]:
                break
            await asyncio.sleep(0.2)
        ends = status["endpoints"]
        assert ends["tftp"] == f"127.0.0.1:{env['STREAMBOOT_TFTP_PORT']}"
        assert ends["dhcp"] == f"127.0.0.1:{dhcp_port}"
        assert ends["boot_http"] == f"http://127.0.0.1:{env['STREAMBOOT_BOOT_HTTP_PORT']}"
    finally:
        await stop(proc)

    code, leases = await cli(env, "dhcp", "leases", "--json")
    assert code == 0
    assert [(x["mac"], x["ip"], x["state"], x["active"]) for x in leases] == [
        ("52:54:00:c0:ff:ee", "10.213.1.10", "bound", True)
    ]

    # Restarted, the server still knows the lease: another client gets another address,
    # and the first one keeps its own.
    proc = await run_boot(env)
    try:
        other = await lease_cycle(dhcp_port, bytes.fromhex("525400000042"))
        again = await lease_cycle(dhcp_port, mac)
    finally:
        await stop(proc)
    assert other.yiaddr == "10.213.1.11" and again.yiaddr == "10.213.1.10"


async def test_a_public_url_is_what_clients_are_sent_to(
    nats_url: str, nats_server: BusServer, tmp_path: Path
) -> None:
    """Behind a TLS proxy (docs/security.md) the scripts chain to the proxy's https URL."""
    env = boot_env(nats_server, tmp_path, free_port())
    env["STREAMBOOT_BOOT_HTTP_PUBLIC_URL"] = "https://boot.example:8443/"
    proc = await run_boot(env)
    try:
        url = f"http://127.0.0.1:{env['STREAMBOOT_BOOT_HTTP_PORT']}/ipxe/boot.ipxe"
        for _ in range(100):
            got = await asyncio.to_thread(
                subprocess.run, ["curl", "-sf", url], capture_output=True, text=True
            )
            if got.returncode == 0:
                break
            await asyncio.sleep(0.2)
        assert "https://boot.example:8443/ipxe/script?" in got.stdout, got.stdout
        assert "http://127.0.0.1" not in got.stdout
    finally:
        await stop(proc)


def test_default_tftp_root_holds_copies_of_the_ipxe_builds(tmp_path: Path) -> None:
    # Debian's /usr/lib/ipxe/ipxe.efi is a symlink to /boot/ipxe.efi, out of that folder:
    # the service serves copies from its data dir instead of following it.
    from services.boot.service import prepare_tftp_root
    from services.boot.tftp_server import resolve_path
    from shared.settings import Settings

    files, elsewhere = tmp_path / "ipxe", tmp_path / "boot"
    files.mkdir()
    elsewhere.mkdir()
    (files / "undionly.kpxe").write_bytes(b"bios" * 100)
    (elsewhere / "ipxe.efi").write_bytes(b"efi" * 100)
    (files / "ipxe.efi").symlink_to(elsewhere / "ipxe.efi")
    settings = Settings(data_dir=tmp_path / "data", boot_files_dir=files)
    root = prepare_tftp_root(settings)
    assert root == (tmp_path / "data" / "boot" / "tftp").absolute()
    assert resolve_path(root, "ipxe.efi").read_bytes() == b"efi" * 100
    assert resolve_path(root, "undionly.kpxe").read_bytes() == b"bios" * 100
    # A package upgrade is picked up at the next start.
    (elsewhere / "ipxe.efi").write_bytes(b"new efi")
    assert (prepare_tftp_root(settings) / "ipxe.efi").read_bytes() == b"new efi"
    # An explicit root is served as it is.
    explicit = Settings(data_dir=tmp_path / "data", tftp_root=files)
    assert prepare_tftp_root(explicit) == files
