"""A client VM on this machine that network-boots from the running system: what a
newcomer without a lab (or a bridge, or root) watches boot in the console.

QEMU's user network needs nothing of the host: its own DHCP hands the VM's iPXE the boot
service's entry script as the boot file, and the VM reaches the host's addresses through
QEMU's NAT. So the system must listen on an address the VM can reach — not loopback, which
inside the VM is the VM itself (``STREAMBOOT_BIND_HOST``, docs/console.md).
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import OperatorError

# The virtio NIC's iPXE ROM QEMU loads (Debian's ipxe-qemu).
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")


def boot_entry_url(runtime: dict[str, object]) -> str:
    """The boot service's entry script, refused when a VM could not reach it."""
    endpoints = runtime.get("endpoints")
    url = endpoints.get("boot_http") if isinstance(endpoints, dict) else None
    if not isinstance(url, str):
        raise OperatorError(
            "streamboot is not running with this data dir, or runs no boot service: "
            "start it with `streamboot up` (or `make up`)"
        )
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        raise OperatorError(
            f"the system listens on {host}, which a VM cannot reach (inside it that address "
            "is the VM itself): start `up` again on this machine's address, e.g. "
            "`STREAMBOOT_BIND_HOST=$(hostname -I | cut -d' ' -f1) make up`"
        )
    return url.rstrip("/") + "/ipxe/boot.ipxe"


def vm_argv(entry_url: str, mac: str, memory_mib: int = 512, kvm: bool = False) -> list[str]:
    """QEMU booting from its virtio NIC (iPXE), its serial console on this terminal.
    Emulated (TCG) unless ``kvm``: a nested or half-working KVM can leave iPXE rebooting."""
    return [
        "qemu-system-x86_64", "-machine", f"pc,accel={'kvm' if kvm else 'tcg'}",
        "-m", str(memory_mib),
        "-nographic", "-no-reboot", "-boot", "n",
        "-netdev", f"user,id=n0,bootfile={entry_url}",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
    ]  # fmt: skip


def missing_tools() -> list[str]:
    """Debian packages to install first."""
    missing = [] if shutil.which("qemu-system-x86_64") else ["qemu-system-x86"]
    return missing + ([] if IPXE_ROM.exists() else ["ipxe-qemu"])
