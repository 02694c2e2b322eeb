"""The client built into real initramfs images by each family's own tool: dracut (Debian's
dracut-core and dracut-network, as on Fedora/RHEL) and initramfs-tools (inside the
debootstrapped Debian that `vdisk build-debian` caches, when the tests have made it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from shared.initramfs import root_client
from streamboot.client_package import PACKAGE_TREE
from tests.client.conftest import CORE, TEST_CACHE, build_dracut, debian_root, dracut_missing

HOOK = PACKAGE_TREE / "usr/share/initramfs-tools/hooks/streamboot"
SCRIPT = PACKAGE_TREE / "usr/share/initramfs-tools/scripts/streamboot"


def kernel_modules() -> Path | None:
    """A Debian kernel's /lib/modules/<version>: the cached Debian's, else the demo's."""
    root = debian_root()
    candidates = list((root / "lib/modules").iterdir()) if root else []
    candidates += sorted(TEST_CACHE.glob("kernel/linux-image-*/lib/modules/*"))
    return next(iter(candidates), None)


@pytest.mark.skipif(bool(dracut_missing()), reason=str(dracut_missing()))
def test_dracut_builds_the_module_into_an_initramfs(tmp_path: Path) -> None:
    modules = kernel_modules()
    kernel = ["--kmoddir", str(modules), "--kver", modules.name] if modules else ["--no-kernel"]
    out = tmp_path / "initramfs.img"
    # Only the module and what it depends on, uncompressed: a quick build.
    build_dracut(out, tmp_path, "--modules", "streamboot", *kernel, "--no-compress")
    listing = subprocess.run(
        ["lsinitrd", str(out)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    files = {line.split()[-1] for line in listing.splitlines() if line.startswith(("-", "l"))}
    for want in (
        "usr/lib/streamboot/client.sh",
        "usr/lib/dracut/hooks/cmdline/90-parse-streamboot.sh",
        "usr/lib/dracut/hooks/mount/90-mount-streamboot.sh",
        "usr/lib/dracut/hooks/initqueue/settled/90-attach-streamboot.sh",
        "usr/sbin/streambootroot",
        "usr/sbin/nbd-client",
        "usr/sbin/netroot",  # the network module runs the handler once the NIC is up
    ):
        assert want in files, f"{want} missing from the dracut initramfs"
    if modules:
        assert any(f.endswith("/nbd.ko") for f in files)
        assert any(f.endswith("/overlay.ko") for f in files)
    # The core inside is the repo's, byte for byte.
    core = subprocess.run(
        ["lsinitrd", "-f", "usr/lib/streamboot/client.sh", str(out)],
        capture_output=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert core == CORE.read_bytes()
    # What the registry reads at import to tell the operator whether the client is there.
    assert root_client(out) == "streamboot"


def test_initramfs_tools_builds_the_hook_and_script_into_an_initramfs() -> None:
    root = debian_root()
    if root is None:
        pytest.skip("no cached Debian root: run the realos tests (vdisk build-debian) once")
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot)")
    # A private CONFDIR inside the cached root's /tmp: the cached root itself is unchanged.
    with tempfile.TemporaryDirectory(prefix="sbtest-", dir=root / "tmp") as tmp:
        conf = Path(tmp)
        inside = Path("/tmp") / conf.name
        (conf / "hooks").mkdir()
        (conf / "scripts").mkdir()
        shutil.copy(HOOK, conf / "hooks/streamboot")
        shutil.copy(SCRIPT, conf / "scripts/streamboot")
        shutil.copy(CORE, conf / "client.sh")
        text = (root / "etc/initramfs-tools/initramfs.conf").read_text()
        # Only the modules the hooks ask for, uncompressed: a quick build.
        text += "\nMODULES=list\nCOMPRESS=cat\n"
        (conf / "initramfs.conf").write_text(text)
        [kver] = [p.name for p in (root / "lib/modules").iterdir()]
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "STREAMBOOT_CORE": f"{inside}/client.sh",
            "LC_ALL": "C",
        }
        done = subprocess.run(
            ["chroot", str(root), "mkinitramfs", "-d", str(inside), "-o",
             f"{inside}/initrd.img", kver],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        listing = subprocess.run(
            ["chroot", str(root), "lsinitramfs", f"{inside}/initrd.img"],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        ).stdout.split()  # fmt: skip
        for want in ("scripts/streamboot", "usr/sbin/nbd-client", "usr/sbin/blkid",
                     "usr/sbin/mkfs.ext4", "usr/bin/nc"):  # fmt: skip
            assert want in listing, f"{want} missing from the initramfs-tools initramfs"
        assert any(f.endswith("lib/streamboot/client.sh") for f in listing)
        assert any(f.endswith("/nbd.ko") for f in listing)
        assert any(f.endswith("/overlay.ko") for f in listing)
        assert root_client(conf / "initrd.img") == "streamboot"
        unpacked = conf / "unpacked"
        subprocess.run(
            ["chroot", str(root), "unmkinitramfs", f"{inside}/initrd.img", f"{inside}/unpacked"],
            capture_output=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        assert (unpacked / "scripts/streamboot").read_bytes() == SCRIPT.read_bytes()
