"""The booted OS keeps its DHCP lease: the package's lease.sh (streamboot-lease.service) runs
the real busybox udhcpc against the boot service's DHCP server across a veth pair, renews
the lease of the address the initramfs set, and never takes that address off the NIC, also
when the lease runs out with no server to renew it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.boot.dhcp_leases import LeaseStore
from services.boot.dhcp_server import DhcpConfig, DhcpResponder, DhcpServer, open_socket
from streamboot.client_package import PACKAGE_TREE
from tests.boot.netns import Link, veth_link

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("busybox") is None or os.geteuid() != 0,
        reason="needs busybox (udhcpc) and root (network namespaces)",
    ),
]
CORE = PACKAGE_TREE / "usr/lib/streamboot/client.sh"
LEASE_SH = PACKAGE_TREE / "usr/lib/streamboot/lease.sh"
ADDRESS = "10.213.0.100"
# busybox udhcpc takes no lease shorter than 16 s: it renews this one after 8.
LEASE_S = 16


@pytest.fixture
def link() -> Iterator[Link]:
    with veth_link() as link:
        yield link


def on_nic(link: Link) -> str:
    return subprocess.run(
        ["ip", "-n", link.client_ns, "-4", "-o", "addr", "show", "dev", link.client_if],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip


def set_address(link: Link) -> None:
    """The address on the NIC, as the initramfs set it."""
    subprocess.run(["ip", "-n", link.client_ns, "addr", "add", f"{ADDRESS}/24", "dev",
                    link.client_if], check=True, timeout=10)  # fmt: skip


def start_keeper(link: Link, run: Path, log: Path) -> subprocess.Popen[bytes]:
    """lease.sh as streamboot-lease.service starts it, in the client's namespace."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            link.client_cmd("env", f"SB_CORE={CORE}", f"SB_RUN={run}", "sh", str(LEASE_SH)),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.5)


async def test_the_booted_os_renews_its_lease_and_keeps_its_address(
    link: Link, tmp_path: Path
) -> None:
    cfg = DhcpConfig(
        mode="full", server_ip=link.server_ip, ipxe_script_url="http://10.213.0.1/boot.ipxe",
        pool_start=ADDRESS, pool_end="10.213.0.101", lease_s=LEASE_S,
    )  # fmt: skip
    leases = LeaseStore(tmp_path / "leases.json", ADDRESS, "10.213.0.101")
    # What iPXE's DHCP left: a bound lease, its address set on the NIC by the initramfs.
    first = leases.bind(link.client_mac, ADDRESS, LEASE_S, time.time(), None)
    assert first is not None
    set_address(link)
    run = tmp_path / "run"
    run.mkdir()
    (run / "session").write_text(
        f"SESSION_ID=s1\nWRITE_CACHE=server-disk\nPERSISTENCE=discard\n"
        f"SERVER=http://{link.server_ip}:9\nMAC={link.client_mac}\nIFACE={link.client_if}\n"
    )
    server = DhcpServer(DhcpResponder(cfg, leases), server_port=67, client_port=68)
    await server.start(link.in_server_ns(lambda: open_socket("0.0.0.0", 67, link.server_if)))
    log = tmp_path / "lease.log"
    keeper = start_keeper(link, run, log)
    stopped = False
    try:
        # Renewed: the lease runs past the one iPXE got, more than once, same address.
        renewed = first.expires + LEASE_S
        await until(
            lambda: leases.by_mac[link.client_mac].expires > renewed, 60,
            f"the lease was not renewed:\n{log.read_text()}",
        )  # fmt: skip
        lease = leases.by_mac[link.client_mac]
        assert (lease.ip, lease.state) == (ADDRESS, "bound")
        assert f"inet {ADDRESS}/24" in on_nic(link)

        # No server any more: the lease runs out, udhcpc deconfigures and fails to get a new
        # one, and the address the root is streamed to stays on the NIC.
        await server.stop()
        stopped = True
        await until(
            lambda: "leasefail on" in log.read_text(), 90,
            f"udhcpc never gave up on the lease:\n{log.read_text()}",
        )  # fmt: skip
        assert f"inet {ADDRESS}/24" in on_nic(link)
        assert keeper.poll() is None, log.read_text()  # still asking
    finally:
        keeper.terminate()
        keeper.wait(10)
        if not stopped:
            await server.stop()


def test_without_the_nic_in_the_session_it_does_nothing(tmp_path: Path) -> None:
    """A session without IFACE= (the dracut client: the distribution's network service holds
    the lease) or no session at all: lease.sh exits at once without starting udhcpc."""
    for session in ("SERVER=http://10.0.0.1:9\nMAC=52:54:00:12:34:56\n", None):
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        if session is not None:
            (run / "session").write_text(session)
        done = subprocess.run(
            ["env", f"SB_CORE={CORE}", f"SB_RUN={run}", "sh", str(LEASE_SH)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done
