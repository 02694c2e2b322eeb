"""A real Debian boots its root over iSCSI through the iBFT, the path Windows takes
(docs/iscsi.md, "A Linux root through the iBFT").

`vdisk build-debian --packages open-iscsi` makes the image (Debian's open-iscsi puts
iscsistart and its local-top script into the initramfs); boot method `iscsi-ibft`: iPXE
logs in to the session's target as the device, with its mutual CHAP, `sanhook`s the disk
(which leaves the iBFT in memory) and starts the version's kernel over HTTP with
`iscsi_auto`; the initramfs's `iscsistart -b` logs in again from the table alone (portal,
target, initiator name, CHAP) and the root mounts from the iSCSI disk, to the marker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from streamboot.debian_image import DEFAULT_MIRROR, MARKER, bootstrap, packages_for
from tests.client.conftest import TEST_CACHE
from tests.conftest import traversable_tmpdir
from tests.e2e.pxe_lab import STREAMBOOT, BootLab
from tests.e2e.test_realos_boot import (
    BOOT_S,
    MEMORY,
    REALOS_TIMERS,
    add_device,
    marker,
    realos_missing,
    wait_closed,
)
from tests.stream.conftest import sha256

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
        lab.start(**REALOS_TIMERS)
        # The namespace has no way out: the debootstrap comes into the test cache first.
        bootstrap(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(PACKAGES), say=print)
        build = subprocess.run(
            lab.exec(str(STREAMBOOT), "vdisk", "build-debian", VDISK, "--size", "2G",
                     "--packages", ",".join(PACKAGES), "--cache-dir", str(TEST_CACHE),
                     "--data-dir", str(lab.data_dir)),
            capture_output=True, text=True, timeout=3600, check=False,
        )  # fmt: skip
        assert build.returncode == 0, f"build-debian:\n{build.stdout}\n{build.stderr}"
        yield lab
    finally:
        lab.stop()
        if not os.environ.get("STREAMBOOT_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


def test_debian_mounts_its_root_over_iscsi_from_the_ibft_with_mutual_chap(lab: BootLab) -> None:
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
    # Two logins to the same session: iPXE's (the hook) and the booted kernel's (the iBFT).
    assert [a["protocol"] for a in attached] == ["iscsi", "iscsi"], attached
    assert not lab.events("--type", "IscsiLoginRefused")
    # The OS wrote (the journal, the marker's state) into the session's write cache only.
    assert sha256(golden) == before
    wait_closed(lab, mac)
