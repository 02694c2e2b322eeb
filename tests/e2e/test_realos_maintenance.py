"""The image lifecycle on a real Debian (docs/registry.md, "Maintenance through PXE"): a
device in maintenance PXE-boots the vdisk read-write, changes the OS inside it and powers
off; `vdisk commit` publishes its writes, `promote` takes them to test (a tester boots
them) then production; a production device that booted before the promote keeps its version until it reboots,
and then sees the change. The golden layer never changes.

The change: the device's kernel arguments carry `streamboot-marker.proof=WORD`, on which
the image's marker unit writes WORD into /etc/streamboot-maint-proof; every boot prints
`STREAMBOOT-PROOF <content or none>` on its console (streamboot/debian_image.py).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest

from streamboot.debian_image import MARKER, PROOF
from tests.e2e.pxe_lab import BootLab, pxe_vm_argv, watch_vm
from tests.e2e.test_realos_boot import (  # noqa: F401  (lab: the fixture)
    ARGS,
    BOOT_S,
    MEMORY,
    POWER_DOWN,
    VDISK,
    add_device,
    boot,
    lab,
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
WORD = "maint-proof-7f3a"
COMMIT_S = 1200.0  # a 2 GiB image materialised and diffed on a loaded machine


def proof(console: str) -> str:
    """What the booted root held in /etc/streamboot-maint-proof ("none": no such file)."""
    found = re.search(rf"{PROOF} (\S+)", console)
    assert found, console[-5000:]
    return found.group(1)


def sessions_of(booted: BootLab, mac: str) -> list[dict[str, Any]]:
    return [e["data"] for e in booted.events("--mac", mac) if e["type"] == "SessionOpened"]


def test_a_maintenance_boot_changes_the_os_and_the_fleet_gets_it_at_its_next_boot(
    lab: BootLab,  # noqa: F811
) -> None:
    golden = lab.data_dir / "vdisks" / VDISK / "v1.raw"
    before = sha256(golden)
    maint, prod, tester = "52:54:00:88:00:31", "52:54:00:88:00:32", "52:54:00:88:00:33"
    add_device(lab, maint, "deb-maint")
    add_device(lab, prod, "deb-prod")
    add_device(lab, tester, "deb-tester")
    lab.cli("device", "set", tester, "--tester")
    lab.cli("device", "set", maint, "--kernel-args", f"{ARGS} streamboot-marker.proof={WORD}")
    lab.cli("device", "maintenance", maint, "on")

    # 1. The maintenance boot: read-write on the latest version, the change, a power-off.
    console = boot(lab, maint, 0)
    assert proof(console) == WORD
    assert marker(console)["rootfs"] == "ext4"
    [opened] = sessions_of(lab, maint)
    assert opened["maintenance"] is True and opened["version"] == 1, opened

    # 2. Commit (the session is closed: boot() waited for it), then promote.
    lab.cli("vdisk", "commit", VDISK, timeout=COMMIT_S)
    lab.cli("device", "maintenance", maint, "off")
    versions = json.loads(lab.cli("vdisk", "versions", VDISK, "--json").stdout)
    new = max(v["version"] for v in versions)
    [published] = [v for v in versions if v["version"] == new]
    assert published["stage"] == "maintenance" and published["changed_blocks"] > 0, published
    lab.cli("vdisk", "promote", VDISK, str(new), "--to", "test")

    # 3. A tester boots the test version (beside the production device below, at once).
    tested: dict[str, str] = {}
    errors: list[BaseException] = []

    def boot_the_tester() -> None:
        try:
            tested["console"] = boot(lab, tester, 2)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    testing = threading.Thread(target=boot_the_tester)
    testing.start()
    # A production device booted before the promote to production keeps version 1: the
    # promote lands while it runs (at its marker), and its root never had the change.
    promoted: list[str] = []

    def promote_while_it_runs(_text: str, _vm_pid: int) -> None:
        lab.cli("vdisk", "promote", VDISK, str(new), "--to", "production")
        promoted.append(VDISK)

    run = watch_vm(
        lab.exec(*pxe_vm_argv(prod, 1, memory_mib=MEMORY)), lab.root / "vm-prod-before.log",
        until=None, timeout_s=BOOT_S, watch=(MARKER,), on_seen=promote_while_it_runs,
    )  # fmt: skip
    testing.join()
    if errors:
        raise errors[0]
    assert proof(tested["console"]) == WORD
    assert sessions_of(lab, tester)[-1]["version"] == new
    assert promoted, f"the production device never reached multi-user:\n{run.console[-5000:]}"
    assert POWER_DOWN in run.console, run.console[-3000:]
    assert proof(run.console) == "none"
    wait_closed(lab, prod)
    [early] = sessions_of(lab, prod)
    assert early["version"] == 1, early
    story = lab.events("--limit", "1000000")
    order = [
        e["type"]
        for e in story
        if (e["type"] in ("SessionOpened", "SessionClosed")
            and e["data"]["session_id"] == early["session_id"])
        or (e["type"] == "VdiskVersionPromoted" and e["data"].get("stage") == "production")
    ]  # fmt: skip
    assert order == ["SessionOpened", "VdiskVersionPromoted", "SessionClosed"], order

    # ... and at its next boot it gets the new version, with the change in it.
    again = boot(lab, prod, 1)
    assert proof(again) == WORD
    assert marker(again)["hostname"] == "deb-prod"
    late = sessions_of(lab, prod)[-1]
    assert late["version"] == new and not late.get("maintenance"), late

    # 4. The golden layer is as it was: the change lives in version 2's delta.
    assert sha256(golden) == before
