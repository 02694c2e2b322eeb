"""build-debian's cached root: what a chroot left mounted inside it is unmounted and never
copied (a live /proc there made the copy block for ever on /proc/kmsg)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from streamboot.debian_image import unmount_below

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")


def mounted(point: Path) -> bool:
    return any(
        line.split()[1] == str(point) for line in Path("/proc/mounts").read_text().splitlines()
    )


def test_what_a_chroot_left_mounted_in_the_root_is_unmounted(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "proc").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True, timeout=30)
    try:
        assert mounted(rootfs / "proc")
        unmount_below(rootfs)
        assert not mounted(rootfs / "proc")
        assert (rootfs / "proc").is_dir() and not any((rootfs / "proc").iterdir())
    finally:
        if mounted(rootfs / "proc"):
            subprocess.run(["umount", "--lazy", str(rootfs / "proc")], timeout=30, check=False)
