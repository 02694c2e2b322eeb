"""A real Debian (systemd, Debian's kernel, the streamboot client package) PXE-boots from
`streamboot up` to multi-user, kernel-direct, under QEMU TCG in a network namespace.

`vdisk build-debian` makes the vdisk (its debootstrap cached in the test cache). Each VM's
marker unit prints `STREAMBOOT-BOOTED hostname=.. machine-id=.. rootfs=.. boot-id=..
last-boot=..` on the serial console at multi-user, then powers off cleanly (the device's
kernel arguments ask it to): last-boot= tells whether the previous boot's writes survived.
`make test-realos` runs these; each boot takes about a minute or two under TCG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamboot.debian_image import (
    DEFAULT_MIRROR,
    MARKER,
    PARTITION_START,
    SECTOR,
    bootstrap,
    packages_for,
)
from tests.client.conftest import TEST_CACHE, build_dracut, debian_root, dracut_missing
from tests.conftest import traversable_tmpdir
from tests.e2e.pxe_lab import (
    OVMF,
    SHORT_SESSION_TIMERS,
    STREAMBOOT,
    BootLab,
    pxe_tools_missing,
)
from tests.stream.conftest import sha256


def realos_missing() -> list[str]:
    missing = pxe_tools_missing()
    missing += [p for t, p in {"debootstrap": "debootstrap", "sfdisk": "fdisk"}.items()
                if shutil.which(t) is None]  # fmt: skip
    return missing


pytestmark = [
    pytest.mark.slow,
    pytest.mark.realos,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(bool(realos_missing()), reason=f"needs {realos_missing()}"),
]
VDISK = "debian"
# no_timer_check: a TCG guest starved of CPU can fail the kernel's early timer check.
ARGS = "console=ttyS0 panic=-1 no_timer_check streamboot-marker.poweroff=1"
POWER_DOWN = "reboot: Power down"
BOOT_S = 600.0  # one boot under TCG on a shared machine, power-off included
MEMORY = 1024
# The lab's short session timers, but a dead connection found after 30 s rather than 9: a
# TCG guest on a loaded machine can leave keepalive probes unanswered for seconds.
REALOS_TIMERS = {
    **SHORT_SESSION_TIMERS,
    # The product's detach grace: a guest starved by the loaded host times its NBD requests
    # out on a live node and reattaches, which can take longer than a short grace; the
    # registry would close the session meanwhile and every reattach after that is refused.
    "STREAMBOOT_SESSION_DETACH_GRACE_S": "30",
    "STREAMBOOT_STREAM_KEEPALIVE_IDLE_S": "15",
    "STREAMBOOT_STREAM_KEEPALIVE_INTERVAL_S": "5",
    "STREAMBOOT_STREAM_KEEPALIVE_COUNT": "3",
}


@pytest.fixture(scope="module")
def lab() -> Iterator[BootLab]:
    yield from realos_lab()


def realos_lab(**env: str) -> Iterator[BootLab]:
    """A lab with the Debian vdisk built, `up` started with the real-OS timers and ``env``;
    stopped and removed at the end."""
    root = traversable_tmpdir("streamboot-realos-")
    lab = BootLab(root, taps=3)
    lab.create()
    try:
        lab.start(**REALOS_TIMERS, **env)
        # The namespace has no way out: the debootstrap comes from the host's network into
        # the test cache first (once; a user's first build does the same).
        bootstrap(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(()), say=print)
        build = subprocess.run(
            lab.exec(str(STREAMBOOT), "vdisk", "build-debian", VDISK, "--size", "2G",
                     "--cache-dir", str(TEST_CACHE), "--data-dir", str(lab.data_dir)),
            capture_output=True, text=True, timeout=3600, check=False,
        )  # fmt: skip
        assert build.returncode == 0, f"build-debian:\n{build.stdout}\n{build.stderr}"
        yield lab
    finally:
        lab.stop()
        if not os.environ.get("STREAMBOOT_KEEP_LAB"):  # set: the consoles stay for a look
            shutil.rmtree(root, ignore_errors=True)


def marker(console: str) -> dict[str, str]:
    """The fields of the marker line (fails with the console's end when there is none)."""
    found = re.search(rf"{MARKER} (hostname=\S+ machine-id=\S+ rootfs=\S+ boot-id=\S+ "
                      r"last-boot=\S+)", console)  # fmt: skip
    assert found, console[-5000:]
    return dict(kv.split("=", 1) for kv in found.group(1).split())


def add_device(lab: BootLab, mac: str, hostname: str, vdisk: str = VDISK) -> str:
    """Register the device (booting ``vdisk``); returns the machine-id the registry holds."""
    out = lab.cli("device", "add", mac, "--hostname", hostname, "--kernel-args", ARGS, "--json")
    lab.cli("assign", mac, vdisk, "--default")
    return json.loads(out.stdout)["machine_id"]


def boot(lab: BootLab, mac: str, tap: int, **vm: object) -> str:
    """One boot to the marker and the clean power-off after it, until its session closed
    (the next boot then gets a fresh one); its console."""
    console = lab.boot_vm(mac, tap, until=None, timeout_s=BOOT_S, memory_mib=MEMORY, **vm)
    assert "streamboot: root /dev/nbd0" in console, console[-5000:]
    assert POWER_DOWN in console, f"no clean power-off:\n{console[-3000:]}"
    wait_closed(lab, mac)
    return console


def wait_closed(lab: BootLab, mac: str) -> None:
    """Every session of the MAC closed (the next boot then gets a fresh one)."""
    deadline = time.monotonic() + 120
    while True:
        story = lab.events("--mac", mac)
        opened = {e["data"]["session_id"] for e in story if e["type"] == "SessionOpened"}
        closed = {
            e["data"]["session_id"]
            for e in lab.events("--type", "SessionClosed")
            if e["data"]["session_id"] in opened
        }
        if opened <= closed:
            return
        assert time.monotonic() < deadline, f"sessions {opened - closed} still open"
        time.sleep(1)


def test_two_vms_boot_the_real_debian_at_once_each_as_itself(lab: BootLab) -> None:
    golden = lab.data_dir / "vdisks" / VDISK / "v1.raw"
    before = sha256(golden)
    shown = lab.cli("vdisk", "show", VDISK).stdout
    assert "kernel-direct" in shown, shown
    macs = {"52:54:00:88:00:01": "deb-001", "52:54:00:88:00:02": "deb-002"}
    ids = {mac: add_device(lab, mac, name) for mac, name in macs.items()}
    consoles: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(mac: str, tap: int) -> None:
        try:
            consoles[mac] = boot(lab, mac, tap)
        except BaseException as exc:  # the assertion is re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m, i)) for i, m in enumerate(macs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seen = {mac: marker(consoles[mac]) for mac in macs}
    for mac, name in macs.items():
        assert seen[mac]["hostname"] == name
        assert seen[mac]["machine-id"] == ids[mac]
        assert seen[mac]["rootfs"] == "ext4"  # server-disk: the export itself, read-write
        assert seen[mac]["last-boot"] == "none"
        assert "Reached target" in consoles[mac] and "Multi-User System" in consoles[mac]
    assert len({s["machine-id"] for s in seen.values()}) == 2
    # Each booted OS wrote (journal, the marker's state) into its write cache, never here.
    assert sha256(golden) == before

    # A discarded write cache: the first machine's next boot finds none of those writes.
    first = next(iter(macs))
    again = marker(boot(lab, first, 0))
    assert again["last-boot"] == "none"
    assert again["boot-id"] != seen[first]["boot-id"]


def test_a_kept_server_write_cache_keeps_the_writes_across_reboots(lab: BootLab) -> None:
    mac = "52:54:00:88:00:03"
    add_device(lab, mac, "deb-keep")
    lab.cli("vdisk", "set", VDISK, "--persistence", "keep")
    try:
        one = marker(boot(lab, mac, 2))
        two = marker(boot(lab, mac, 2))
    finally:
        lab.cli("vdisk", "set", VDISK, "--persistence", "discard")
    assert two["last-boot"] == one["boot-id"]


def test_client_ram_mounts_an_overlay_in_ram(lab: BootLab) -> None:
    mac = "52:54:00:88:00:04"
    add_device(lab, mac, "deb-ram")
    lab.cli("vdisk", "set", VDISK, "--write-cache", "client-ram")
    try:
        console = boot(lab, mac, 0)
    finally:
        lab.cli("vdisk", "set", VDISK, "--write-cache", "server-disk")
    seen = marker(console)
    assert seen["rootfs"] == "overlay" and seen["hostname"] == "deb-ram"
    assert "(client-ram write cache)" in console


def test_client_disk_uses_the_local_partition_formatted_when_discarded(
    lab: BootLab, tmp_path: Path
) -> None:
    mac = "52:54:00:88:00:05"
    add_device(lab, mac, "deb-disk")
    lab.cli("vdisk", "set", VDISK, "--write-cache", "client-disk")
    try:
        # No local disk: a clear message, the write cache in RAM, the boot goes on.
        console = boot(lab, mac, 1)
        assert "no local partition labelled streamboot-wc" in console, console[-4000:]
        assert marker(console)["rootfs"] == "overlay"
        # ... which the operator sees as an event too.
        [notice] = [e["data"] for e in lab.events("--mac", mac) if e["type"] == "ClientNotice"]
        assert notice["kind"] == "wc-ram-fallback" and "streamboot-wc" in notice["message"]

        local = tmp_path / "local.img"
        with open(local, "wb") as f:
            f.truncate(512 * 2**20)
        subprocess.run(["mkfs.ext4", "-q", "-L", "streamboot-wc", str(local)], check=True)
        one = boot(lab, mac, 1, drives=(local,))
        two = boot(lab, mac, 1, drives=(local,))
        for console in (one, two):
            assert "write cache on the local partition /dev/vda" in console, console[-4000:]
            assert "formatting the local write cache /dev/vda" in console
            assert marker(console)["rootfs"] == "overlay"
        assert marker(two)["last-boot"] == "none"  # discard: formatted at boot

        lab.cli("vdisk", "set", VDISK, "--persistence", "keep")
        three = boot(lab, mac, 1, drives=(local,))
        assert "formatting the local write cache" not in three
        assert marker(three)["last-boot"] == marker(two)["boot-id"]
    finally:
        lab.cli("vdisk", "set", VDISK, "--write-cache", "server-disk", "--persistence", "discard")


@pytest.mark.skipif(not OVMF.exists(), reason="needs ovmf")
def test_a_uefi_machine_boots_through_ipxe_efi_over_tftp(lab: BootLab) -> None:
    mac = "52:54:00:88:00:06"
    add_device(lab, mac, "deb-uefi")
    console = boot(lab, mac, 2, uefi=True)
    seen = marker(console)
    assert seen["hostname"] == "deb-uefi" and seen["rootfs"] == "ext4"
    # The installed client said so at multi-user (streamboot-booted.service).
    story = lab.events("--mac", mac)
    [opened] = [e["data"]["session_id"] for e in story if e["type"] == "SessionOpened"]
    booted = [e["data"] for e in story if e["type"] == "ClientBooted"]
    assert booted == [{"session_id": opened, "mac": mac}], story
    # The firmware asked as UEFI x64 (RFC 4578 type 7 or 9), so DHCP gave it ipxe.efi.
    asked = [e["data"]["arch"] for e in lab.events("--mac", mac) if e["type"] == "BootRequested"]
    assert set(asked) & {7, 9}, asked


@pytest.mark.skipif(bool(dracut_missing()), reason=str(dracut_missing()))
def test_a_dracut_initramfs_boots_the_same_debian(lab: BootLab, tmp_path: Path) -> None:
    """The dracut module, built by dracut into the image in place of initramfs-tools'
    initramfs (as a Fedora/RHEL image has it), boots the Debian to multi-user."""
    root = debian_root()
    assert root is not None  # the lab's build-debian made it
    [kver] = [p.name for p in (root / "lib/modules").iterdir()]
    initrd = tmp_path / "initrd"
    build_dracut(
        initrd, tmp_path / "work", "--add", "streamboot", "--omit", "plymouth",
        "--kmoddir", str(root / "lib/modules" / kver), "--kver", kver, "--compress", "gzip -1",
    )  # fmt: skip
    image = tmp_path / "dracut.img"
    golden = lab.data_dir / "vdisks" / VDISK / "v1.raw"
    subprocess.run(["cp", "--sparse=always", str(golden), str(image)], check=True, timeout=600)
    # The image's initramfs replaced without a mount: debugfs on the root partition.
    subprocess.run(
        ["debugfs", "-w", "-f", "-", f"{image}?offset={PARTITION_START * SECTOR}"],
        input=f"cd /boot\nrm initrd.img-{kver}\nwrite {initrd} initrd.img-{kver}\n",
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    lab.cli("vdisk", "import", str(image), "--name", "debian-dracut")
    mac = "52:54:00:88:00:07"
    machine_id = add_device(lab, mac, "deb-dracut", vdisk="debian-dracut")
    console = boot(lab, mac, 0)
    assert "dracut-" in console and "(Initramfs)" in console, console[-4000:]
    seen = marker(console)
    assert seen["hostname"] == "deb-dracut" and seen["machine-id"] == machine_id
    assert seen["rootfs"] == "ext4"


def test_an_image_booted_by_debians_own_nbdroot(lab: BootLab) -> None:
    """Boot method nbdroot: the image's initramfs-tools boots its root through nbd-client's
    own script (boot=local, nbdroot=), not the streamboot client, with the server-side
    write cache and the registry's identity."""
    mac = "52:54:00:88:00:08"
    machine_id = add_device(lab, mac, "deb-nbdroot")
    lab.cli("vdisk", "set", VDISK, "--boot-method", "nbdroot")
    try:
        console = lab.boot_vm(mac, 2, until=MARKER, timeout_s=BOOT_S, memory_mib=MEMORY)
    finally:
        lab.cli("vdisk", "set", VDISK, "--boot-method", "auto")
    assert "Setting up nbd-client" in console, console[-5000:]
    assert "streamboot: root" not in console  # the client's script never ran
    seen = marker(console)
    assert seen["hostname"] == "deb-nbdroot" and seen["machine-id"] == machine_id
    assert seen["rootfs"] == "ext4"
