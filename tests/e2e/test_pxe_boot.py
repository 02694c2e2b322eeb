"""The proof of the product: diskless VMs PXE-boot a streamed Linux from `streamboot up`.

In a network namespace with a bridge (tests/e2e/pxe_lab.py): DHCP -> iPXE -> HTTP script ->
kernel-direct (the kernel and initramfs the registry found in the vdisk, over HTTP) ->
initramfs -> the nonce redeemed -> NBD root read and written -> marker -> power off. Then the log tells the boot in order, the write went to
the session's write cache and never into the golden image. A device with two vdisks gets
the menu and boots the default after the timeout; an unknown MAC is refused and sees why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamboot.demo.image import default_cache_dir, fetch_kernel
from tests.conftest import traversable_tmpdir
from tests.e2e.pxe_lab import SHORT_SESSION_TIMERS, BootLab, pxe_tools_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(pxe_tools_missing()), reason=f"needs {pxe_tools_missing()}"),
]
MAC_ONE = "52:54:00:77:00:01"
MAC_MENU = "52:54:00:77:00:02"
MAC_UNKNOWN = "52:54:00:77:00:03"
BOOTED = "streamboot-client: BOOTED"
# The demo's own console and behaviour on a panic, as a device's extra kernel arguments.
CONSOLE = "console=ttyS0 panic=-1"


@pytest.fixture(scope="module")
def lab() -> Iterator[BootLab]:
    root = traversable_tmpdir("streamboot-pxe-")
    lab = BootLab(root)
    lab.create()
    try:
        lab.start(
            **SHORT_SESSION_TIMERS,
            STREAMBOOT_IPXE_MENU_TIMEOUT_S="3",
            STREAMBOOT_UNKNOWN_DEVICE_POLICY="refuse",
        )
        # The lab's namespace has no way out: the kernel comes from the host's network,
        # as when a user runs build-demo (it then finds it in its cache).
        fetch_kernel(default_cache_dir())
        lab.cli("vdisk", "build-demo", "demo")
        lab.cli("vdisk", "build-demo", "other")
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def golden(lab: BootLab, vdisk: str) -> Path:
    return lab.data_dir / "vdisks" / vdisk / "v1.raw"


def test_a_vm_pxe_boots_the_demo_vdisk_end_to_end(lab: BootLab) -> None:
    image = golden(lab, "demo")
    before = sha256(image)
    shown = lab.cli("vdisk", "show", "demo").stdout
    assert "boots kernel-direct: kernel " in shown and "root UUID=" in shown, shown
    lab.cli("device", "add", MAC_ONE, "--hostname", "pxe-001", "--kernel-args", CONSOLE)
    lab.cli("assign", MAC_ONE, "demo", "--default")

    console = lab.boot_vm(MAC_ONE, tap=0, until="reboot: Power down")
    assert f"{BOOTED} demo" in console, console[-4000:]
    for step in (
        "Filename: http://10.77.0.1:",  # DHCP handed iPXE its script URL
        "streamboot: booting demo version 1 as pxe-001 (kernel ",  # the script for this MAC
        # iPXE loads the kernel over HTTP (the path names the MAC: its span in the trace)
        f"/boot-files/demo/1/{MAC_ONE.replace(':', '-')}/vmlinuz",
        "streamboot.nonce=",  # on the kernel command line
        "attached nbd://10.77.0.1:",  # the nonce redeemed, the export attached
        "streamboot-client: disk /dev/nbd0",
        "streamboot-client: WROTE ",
    ):
        assert step in console, f"missing {step!r}:\n{console[-4000:]}"

    closed = lab.wait_for_event("SessionClosed", timeout_s=90)
    [opened] = [e for e in lab.events("--mac", MAC_ONE) if e["type"] == "SessionOpened"]
    sid = opened["data"]["session_id"]
    story = [e["type"] for e in lab.events("--mac", MAC_ONE)]
    assert story.index("BootRequested") < story.index("SessionOpened")
    session = lab.events("--stream", f"session-{sid}")
    types = [e["type"] for e in session]
    assert types[0] == "SessionOpened" and types[-1] == "SessionClosed", types
    protocols = [e["data"]["protocol"] for e in session if e["type"] == "SessionAttached"]
    assert protocols == ["nbd"]  # kernel-direct: no firmware disk phase, the NBD root only
    assert any(e["data"]["session_id"] == sid for e in closed)

    # The VM's write went to its session's write cache, never into the golden image.
    size = image.stat().st_size
    scratch = size - 1024 * 1024
    writes = [
        x
        for e in session
        if e["type"] == "BlocksRequested"
        for x in e["data"]["extents"]
        if x[3] == "w"
    ]
    assert any(x[1] <= scratch < x[1] + x[2] for x in writes), writes
    written = sum(e["data"]["bytes_written"] for e in session if e["type"] == "SessionDetached")
    assert written > 0
    record = console.split("streamboot-client: WROTE ", 1)[1].split("\n", 1)[0].strip().encode()
    with open(image, "rb") as f:
        f.seek(scratch)
        assert f.read(len(record)) != record
    assert sha256(image) == before
    assert_one_trace_per_boot(lab, sid)


# Every step of a PXE boot, as spans of one trace (the FastStream spans of the registry's
# handlers come on top).
BOOT_SPANS = {
    "dhcp", "assignment lookup", "ipxe script", "registry.session.open",
    "kernel download", "initrd download",
    "nbd connection", "first read", "redeem", "booted", "boot pxe-001",
}  # fmt: skip


def assert_one_trace_per_boot(lab: BootLab, sid: str) -> None:
    deadline = time.monotonic() + 30  # spans are exported in batches every few seconds
    while True:
        done = lab.cli("trace", "show", sid, "--json", check=False)
        spans = json.loads(done.stdout) if done.returncode == 0 else []
        names = {s["name"] for s in spans}
        if BOOT_SPANS <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert BOOT_SPANS <= names, f"missing spans {BOOT_SPANS - names}; got {sorted(names)}"
    assert len({s["trace_id"] for s in spans}) == 1
    [root] = [s for s in spans if s["name"] == "boot pxe-001"]
    assert root["parent_id"] is None
    assert {s["service"] for s in spans} >= {"boot", "registry", "stream"}
    # The root covers the whole boot: from the first DHCP packet to the session's end.
    assert root["start_ns"] <= min(s["start_ns"] for s in spans)
    assert root["end_ns"] >= max(s["end_ns"] for s in spans if s["name"] != "boot pxe-001")
    # Kernel-direct: the kernel and initramfs came from the boot service, the stream served
    # the root disk only (the demo reads its partition table, scratch area and root).
    assert 0 < root["attributes"]["streamboot.bytes_read"] < 5_000_000
    waterfall = lab.cli("trace", "show", sid).stdout
    assert "boot pxe-001" in waterfall and "nbd connection" in waterfall


@pytest.mark.vm  # a second VM boot: make test-vm
def test_two_vdisks_give_a_menu_that_boots_the_default(lab: BootLab) -> None:
    lab.cli("device", "add", MAC_MENU, "--hostname", "pxe-002", "--kernel-args", CONSOLE)
    lab.cli("assign", MAC_MENU, "demo")
    lab.cli("assign", MAC_MENU, "other", "--default")
    # Until the VM powers off: stopping at "BOOTED" could cut the line before the vdisk's
    # name (seen on a loaded machine: the console ended at "BOOTED oth").
    console = lab.boot_vm(MAC_MENU, tap=1, until="reboot: Power down")
    assert f"{BOOTED} other" in console, console[-4000:]
    menus = [e for e in lab.events("--mac", MAC_MENU) if e["type"] == "BootMenuShown"]
    assert menus and menus[0]["data"]["vdisks"] == ["demo", "other"]
    assert menus[0]["data"]["default"] == "other"
    assert any(m["data"]["chosen"] == "other" for m in menus)
    [opened] = [e for e in lab.events("--mac", MAC_MENU) if e["type"] == "SessionOpened"]
    assert opened["data"]["vdisk"] == "other"


def test_an_unknown_machine_is_refused_and_told_why(lab: BootLab) -> None:
    console = lab.boot_vm(MAC_UNKNOWN, tap=2, until="streamboot device add", timeout_s=120)
    assert f"this machine ({MAC_UNKNOWN}) may not boot here" in console, console[-3000:]
    assert "refuses unknown devices" in console
    assert BOOTED not in console
    mine = lab.events("--mac", MAC_UNKNOWN)
    assert "SessionOpened" not in [e["type"] for e in mine]
