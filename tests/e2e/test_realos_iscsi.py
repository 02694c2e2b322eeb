"""A real Debian boots its root over iSCSI through the iBFT, the path Windows takes
(docs/iscsi.md, "A Linux root through the iBFT").

`vdisk build-debian --packages open-iscsi` makes the image (Debian's open-iscsi puts
iscsistart and its local-top script into the initramfs); boot method `iscsi-ibft`: iPXE
logs in to the session's target as the device, with its mutual CHAP, `sanhook`s the disk
(which leaves the iBFT in memory) and starts the version's kernel over HTTP with
`iscsi_auto`; the initramfs's `iscsistart -b` logs in again from the table alone (portal,
target, initiator name, CHAP) and the root mounts from the iSCSI disk, to the marker; on
BIOS (mutual CHAP) and on UEFI (ipxe.efi, one-way CHAP). And UEFI `sanboot-iscsi` of a disk
with an EFI boot loader, and iPXE's `sanboot iscsi:` of the demo vdisk (syslinux, kernel and
initramfs read over iSCSI), neither needing the Debian build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stream.iscsi.server import TARGET_PREFIX
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import BlocksRequested, SessionAttached
from streamboot.debian_image import DEFAULT_MIRROR, MARKER, bootstrap, packages_for
from tests.client.conftest import TEST_CACHE
from tests.conftest import traversable_tmpdir
from tests.e2e.pxe_lab import OVMF, SHORT_SESSION_TIMERS, STREAMBOOT, BootLab, pxe_vm_argv
from tests.e2e.test_realos_boot import BOOT_S, MEMORY, add_device, marker, realos_missing
from tests.stream.conftest import ServerThread, sha256
from tests.stream.test_vm_boot import ipxe_vm, run_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realos,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(bool(realos_missing()), reason=f"needs {realos_missing()}"),
]
VDISK = "debian-iscsi"
PACKAGES = ["open-iscsi"]


@pytest.fixture(scope="module")
def lab() -> Iterator[BootLab]:
    root = traversable_tmpdir("streamboot-realos-iscsi-")
    lab = BootLab(root, taps=2)
    lab.create()
    try:
        # Short keepalive and detach grace: iPXE's connection, which it never logs out, is
        # found dead and its detach grace is over seconds after the kernel starts, long
        # before the initramfs logs in from the iBFT. Only the hand-off grace (its default,
        # not raised) keeps the session and its write cache for that login.
        lab.start(**SHORT_SESSION_TIMERS)
        yield lab
    finally:
        lab.stop()
        if not os.environ.get("STREAMBOOT_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def debian(lab: BootLab) -> BootLab:
    """The lab with the Debian vdisk built in it (once per module)."""
    # The namespace has no way out: the debootstrap comes into the test cache first.
    bootstrap(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(PACKAGES), say=print)
    build = subprocess.run(
        lab.exec(str(STREAMBOOT), "vdisk", "build-debian", VDISK, "--size", "2G",
                 "--packages", ",".join(PACKAGES), "--cache-dir", str(TEST_CACHE),
                 "--data-dir", str(lab.data_dir)),
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert build.returncode == 0, f"build-debian:\n{build.stdout}\n{build.stderr}"
    return lab


def seen_ip(console: str) -> str:
    """The address the initramfs configured (open-iscsi's ipconfig line)."""
    found = re.search(r"IP-Config: \S+ complete .*?address: (\S+)", console, re.S)
    assert found, console[-5000:]
    return found.group(1)


def test_debian_mounts_its_root_over_iscsi_from_the_ibft_with_mutual_chap(debian: BootLab) -> None:
    lab = debian
    golden = lab.data_dir / "vdisks" / VDISK / "v1.raw"
    before = sha256(golden)
    mac = "52:54:00:89:00:01"
    machine_id = add_device(lab, mac, "deb-ibft", vdisk=VDISK)
    lab.cli("device", "set", mac, "--chap-user", "deb-ibft", "--chap-secret", "ibft-s3cret-1",
            "--chap-reverse-user", "streamboot", "--chap-reverse-secret", "target-s3cret")  # fmt: skip
    lab.cli("vdisk", "set", VDISK, "--boot-method", "iscsi-ibft")
    console = lab.boot_vm(mac, 0, until=MARKER, timeout_s=BOOT_S, memory_mib=MEMORY)
    seen = marker(console)
    assert seen["hostname"] == "deb-ibft" and seen["machine-id"] == machine_id
    assert seen["rootfs"] == "ext4" and seen["last-boot"] == "none"
    # The kernel's iSCSI initiator, not NBD and not the streamboot client, gave the root.
    assert "iSCSI Initiator over TCP/IP" in console, console[-5000:]
    assert "Attached SCSI disk" in console and "nbd0" not in console
    assert "streamboot: root" not in console

    [opened] = [e["data"]["session_id"] for e in lab.events("--mac", mac)
                if e["type"] == "SessionOpened"]  # fmt: skip
    attached = [e["data"] for e in lab.events("--type", "SessionAttached")
                if e["data"]["session_id"] == opened]  # fmt: skip
    # Logins to the same session, all over iSCSI from the client's address: iPXE's (the
    # hook), the initramfs's from the iBFT, and iscsid's when it takes the session over.
    assert len(attached) >= 2 and {a["protocol"] for a in attached} == {"iscsi"}, attached
    assert {a["client_addr"].rsplit(":", 1)[0] for a in attached} == {seen_ip(console)}
    assert not lab.events("--type", "IscsiLoginRefused")
    # The hand-off: iPXE's connection was found dead (and its detach grace over) before the
    # OS logged in, and the session was kept for that login.
    steps = [e for e in lab.events("--mac", mac)
             if e["type"] in ("SessionAttached", "SessionDetached")]  # fmt: skip
    print("hand-off:", [(e["type"], e.get("time")) for e in steps])
    order = [e["type"] for e in steps]
    assert order[:3] == ["SessionAttached", "SessionDetached", "SessionAttached"], order
    # The OS wrote (the journal, the marker's state) into the session's write cache only.
    assert sha256(golden) == before


@pytest.mark.skipif(not OVMF.exists(), reason="needs ovmf")
def test_a_uefi_machine_hooks_the_disk_with_ipxe_efi_and_boots_the_same(debian: BootLab) -> None:
    """UEFI: OVMF's PXE fetches ipxe.efi over TFTP; its initiator hooks the disk (the iBFT
    goes into the ACPI tables) with one-way CHAP; the kernel (EFI stub) finds the table."""
    lab = debian
    mac = "52:54:00:89:00:02"
    machine_id = add_device(lab, mac, "deb-ibft-efi", vdisk=VDISK)
    lab.cli("device", "set", mac, "--chap-user", "deb-ibft-efi", "--chap-secret", "efi-s3cret-12")
    lab.cli("vdisk", "set", VDISK, "--boot-method", "iscsi-ibft")
    console = lab.boot_vm(mac, 1, until=MARKER, timeout_s=BOOT_S, memory_mib=MEMORY, uefi=True)
    seen = marker(console)
    assert seen["hostname"] == "deb-ibft-efi" and seen["machine-id"] == machine_id
    assert seen["rootfs"] == "ext4"
    assert "iSCSI Initiator over TCP/IP" in console, console[-5000:]
    asked = [e["data"]["arch"] for e in lab.events("--mac", mac) if e["type"] == "BootRequested"]
    assert set(asked) & {7, 9}, asked  # it asked as UEFI x64, so DHCP gave it ipxe.efi
    assert not lab.events("--type", "IscsiLoginRefused")


IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
STARTING = "iPXE initialising devices"  # each time an iPXE starts


def efi_system_disk(path: Path, boot_file: Path) -> Path:
    """A 64 MiB MBR disk whose one partition (type EF, FAT16 from 1 MiB) holds
    \\EFI\\BOOT\\BOOTX64.EFI: what UEFI firmware, and iPXE's sanboot, boot from a disk."""
    with open(path, "wb") as f:
        f.truncate(64 * 2**20)
    subprocess.run(["sfdisk", "--quiet", str(path)], input="label: dos\nstart=2048, type=ef\n",
                   text=True, check=True, timeout=60)  # fmt: skip
    offset = 2048 * 512
    subprocess.run(["mkfs.fat", "-F", "16", "--offset", "2048", str(path),
                    str((64 * 2**20 - offset) // 1024)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    image = f"{path}@@{offset}"
    for folder in ("::/EFI", "::/EFI/BOOT"):
        subprocess.run(["mmd", "-i", image, folder], env=env, check=True, timeout=60)
    subprocess.run(["mcopy", "-i", image, str(boot_file), "::/EFI/BOOT/BOOTX64.EFI"], env=env,
                   check=True, timeout=60)  # fmt: skip
    return path


@pytest.mark.skipif(not (OVMF.exists() and IPXE_EFI.exists()), reason="needs ovmf and ipxe")
def test_uefi_ipxe_sanboots_an_efi_boot_loader_over_iscsi(lab: BootLab, tmp_path: Path) -> None:
    """`sanboot-iscsi` on UEFI: ipxe.efi logs in, exposes the disk to the firmware and
    starts the disk's \\EFI\\BOOT\\BOOTX64.EFI, read over iSCSI. The boot loader on the disk
    is ipxe.efi itself: a second iPXE starting on the console is the sign it ran."""
    image = efi_system_disk(tmp_path / "esp.img", IPXE_EFI)
    lab.cli("vdisk", "import", str(image), "--name", "efi-loader")
    lab.cli("vdisk", "set", "efi-loader", "--boot-method", "sanboot-iscsi")
    mac = "52:54:00:89:00:03"
    add_device(lab, mac, "efi-sanboot", vdisk="efi-loader")
    console_path = lab.root / "vm-efi-sanboot.log"
    argv = lab.exec(*pxe_vm_argv(mac, 0, uefi=True, memory_mib=MEMORY))
    console = console_path.open("wb")
    vm = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOOT_S
        text = ""
        while time.monotonic() < deadline and vm.poll() is None:
            text = console_path.read_text(errors="replace")
            if text.count(STARTING) >= 2:
                break
            time.sleep(1)
    finally:
        vm.kill()
        vm.wait(10)
        console.close()
    text = console_path.read_text(errors="replace")
    assert text.count(STARTING) >= 2, text[-4000:]
    # The second iPXE started once the first one had booted the iSCSI disk.
    booted = text.find("Booting from SAN device 0x80", text.find("Registered SAN device 0x80"))
    assert text.find(STARTING) < booted < text.rfind(STARTING), text[-4000:]
    story = lab.events("--mac", mac)
    [opened] = [e["data"]["session_id"] for e in story if e["type"] == "SessionOpened"]
    attached = [e["data"] for e in lab.events("--type", "SessionAttached")
                if e["data"]["session_id"] == opened]  # fmt: skip
    assert attached and {a["protocol"] for a in attached} == {"iscsi"}, attached


def test_ipxe_sanboots_the_demo_vdisk_over_iscsi(demo_image: Path, tmp_path: Path) -> None:
    """The demo vdisk by `sanboot iscsi:`: iPXE's initiator reads syslinux, which reads the
    kernel and the initramfs through iPXE's INT 13h, all over iSCSI, then starts the kernel
    (syslinux loads the initramfs first). The proof: the kernel's first console lines or
    the initramfs's client (which then finds no disk of its own: this kernel has no iSCSI
    initiator; the OS's own login is the tests above), and the session's reads. A kernel
    that then panics on TCG's timer check on a loaded host ("IO-APIC + timer doesn't
    work") was still read whole."""
    token = "tok-ipxe-demo"
    demo = ExportSpec(
        session_id="demo-session", vdisk="demo", version=1, layers=(demo_image,),
        size=demo_image.stat().st_size, write_cache="server-ram",
    )  # fmt: skip
    server = ServerThread(
        {token: demo},
        StreamSettings(nbd_port=0, http_port=0, iscsi_port=0, write_cache_dir=tmp_path),
    )
    server.start()
    try:
        uri = f"iscsi:10.0.2.2::{server.servers.iscsi_port}:0:{TARGET_PREFIX}{token}"
        script = tmp_path / "boot.ipxe"
        script.write_text(f"#!ipxe\ndhcp\nsanboot {uri}\n")
        out = run_until(ipxe_vm(script), b"streamboot-client:", timeout=600)
        text = out.decode(errors="replace")
        assert "Booting from SAN device 0x80" in text, text[-3000:]
        started = "streamboot-client:" in text or re.search(r"\[\s*\d+\.\d{6}\] ", text)
        assert started, text[-3000:]
        attached = server.events(SessionAttached)
        assert attached and all(e.protocol == "iscsi" for e in attached)
        read = 0
        deadline = time.monotonic() + 10
        while read <= 5 << 20 and time.monotonic() < deadline:  # BlocksRequested: batches
            time.sleep(0.2)
            read = sum(x[2] for e in server.events(BlocksRequested) for x in e.extents
                       if x[3] == "r")  # fmt: skip
        assert read > 5 << 20, read  # a kernel and an initramfs, not a boot sector
    finally:
        server.stop()
