"""`streamboot client package`: the .deb an operator installs into a Debian/Ubuntu image,
read back with dpkg-deb, and the dracut tarball installed with its own `make install`."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from streamboot.client_package import package_version

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

DEB_FILES = {
    "./usr/lib/streamboot/client.sh": "-rw-r--r--",
    "./usr/share/initramfs-tools/hooks/streamboot": "-rwxr-xr-x",
    "./usr/share/initramfs-tools/scripts/streamboot": "-rw-r--r--",
    "./usr/lib/dracut/modules.d/90streamboot/module-setup.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90streamboot/parse-streamboot.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90streamboot/streambootroot.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90streamboot/attach-streamboot.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/modules.d/90streamboot/mount-streamboot.sh": "-rwxr-xr-x",
    "./usr/lib/dracut/dracut.conf.d/90-streamboot.conf": "-rw-r--r--",
    "./usr/lib/streamboot/report.sh": "-rwxr-xr-x",
    "./usr/lib/systemd/system/streamboot-booted.service": "-rw-r--r--",
}
# Enabled by the package itself (no postinst): systemd reads /usr/lib's .wants symlinks.
WANTS = "./usr/lib/systemd/system/multi-user.target.wants/streamboot-booted.service"


def dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_the_deb_path_is_the_last_line(packages: list[Path]) -> None:
    deb = packages[-1]
    assert deb.name == f"streamboot-client_{package_version()}_all.deb"
    assert deb.is_file()


def test_the_deb_declares_its_dependencies_and_initramfs_trigger(
    packages: list[Path], tmp_path: Path
) -> None:
    deb = packages[-1]
    fields = dict(
        line.split(": ", 1)
        for line in dpkg_deb("-f", str(deb)).splitlines()
        if ": " in line and not line.startswith(" ")
    )
    assert fields["Package"] == "streamboot-client"
    assert fields["Version"] == package_version()
    assert fields["Architecture"] == "all"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "nbd-client" in depends
    assert "initramfs-tools | dracut-core" in depends
    dpkg_deb("-e", str(deb), str(tmp_path / "control"))
    triggers = (tmp_path / "control" / "triggers").read_text().splitlines()
    assert "activate-noawait update-initramfs" in triggers


def test_the_deb_holds_the_client_at_its_paths(packages: list[Path]) -> None:
    listing = {}
    links = {}
    for line in dpkg_deb("-c", str(packages[-1])).splitlines():
        line, _, target = line.partition(" -> ")
        perms, owner, *_rest, path = line.split()
        listing[path] = (perms, owner)
        links[path] = target
    assert links[WANTS] == "../streamboot-booted.service" and listing[WANTS][0][0] == "l"
    for path, perms in DEB_FILES.items():
        assert listing.get(path) == (perms, "root/root"), (path, listing.get(path))
    # The demo's initramfs files are not part of the package.
    assert not [p for p in listing if p.endswith(("/init", "handoff.sh", "udhcpc.sh"))]


def test_the_dracut_tarball_installs_with_make_install(
    packages: list[Path], tmp_path: Path
) -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    [tarball] = [p for p in packages if p.name.endswith(".tar.gz")]
    assert tarball.name == f"streamboot-client-dracut-{package_version()}.tar.gz"
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    [src] = (tmp_path / "src").iterdir()
    dest = tmp_path / "dest"
    subprocess.run(
        ["make", "-C", str(src), "install", f"DESTDIR={dest}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    installed = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert installed == sorted(
        p.removeprefix("./") for p in [*DEB_FILES, WANTS] if "initramfs-tools" not in p
    )
    assert (dest / WANTS).is_symlink()
    module = dest / "usr/lib/dracut/modules.d/90streamboot/module-setup.sh"
    assert module.stat().st_mode & 0o111
    conf = (dest / "usr/lib/dracut/dracut.conf.d/90-streamboot.conf").read_text()
    assert 'add_dracutmodules+=" streamboot "' in conf
