"""Build the streamboot Linux client packages from clients/linux/.

``clients/linux/package/`` holds the files at the paths they are installed to: the shell
core (/usr/lib/streamboot/client.sh), the initramfs-tools hook and boot script, the
dracut module, and the booted OS's report to the server (report.sh, a systemd unit enabled
by the symlink in multi-user.target.wants, which both packages keep a symlink). From it come ``streamboot-client_<version>_all.deb`` (dpkg-deb; control and
triggers from ``clients/linux/debian/``) and ``streamboot-client-dracut-<version>.tar.gz``
(the dracut files with ``clients/linux/dracut/Makefile``, for RPM distributions).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
from importlib.metadata import version as dist_version
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "linux"
PACKAGE_TREE = CLIENT_DIR / "package"
DEBIAN_DIR = CLIENT_DIR / "debian"
DRACUT_MAKEFILE = CLIENT_DIR / "dracut" / "Makefile"
# The failover attach helper (docs/failover.md): C, built for the image's machine.
NBD_HELPER_SOURCE = CLIENT_DIR / "nbd-failover" / "streamboot-nbd.c"
NBD_HELPER_PATH = "usr/lib/streamboot/streamboot-nbd"
# The tarball's share of the tree: the core and everything dracut reads.
DRACUT_PATHS = ("usr/lib/streamboot", "usr/lib/dracut", "usr/lib/systemd")


class PackageError(RuntimeError):
    pass


def package_version() -> str:
    return dist_version("streamboot")


def _tree_files(root: Path, under: tuple[str, ...] = ("",)) -> list[Path]:
    files = [p for u in under for p in (root / u).rglob("*") if p.is_file()]
    return sorted(files)


def _mode(path: Path) -> int:
    """Scripts executable, the rest readable: the repo's own modes do not matter."""
    return 0o755 if path.stat().st_mode & 0o100 else 0o644


def build_deb(output: Path) -> Path:
    """``streamboot-client_<version>_all.deb`` in ``output``; returns its path."""
    if shutil.which("dpkg-deb") is None:
        raise PackageError("building the .deb needs dpkg-deb (apt-get install dpkg)")
    version = package_version()
    output.mkdir(parents=True, exist_ok=True)
    deb = output / f"streamboot-client_{version}_all.deb"
    with tempfile.TemporaryDirectory(prefix="streamboot-deb-") as tmp:
        stage = Path(tmp) / "root"
        size = 0
        for src in _tree_files(PACKAGE_TREE):
            dst = stage / src.relative_to(PACKAGE_TREE)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                dst.symlink_to(src.readlink())
                continue
            shutil.copyfile(src, dst)
            dst.chmod(_mode(src))
            size += src.stat().st_size
        for d in [stage, *stage.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
        control = stage / "DEBIAN"
        control.mkdir(mode=0o755)
        text = (DEBIAN_DIR / "control").read_text()
        text = text.replace("@VERSION@", version).replace("@INSTALLED_SIZE@", str(size // 1024 + 1))
        (control / "control").write_text(text)
        shutil.copyfile(DEBIAN_DIR / "triggers", control / "triggers")
        for f in control.iterdir():
            f.chmod(0o644)
        done = subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage), str(deb)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise PackageError(f"dpkg-deb failed: {done.stderr.strip()}")
    return deb


def build_dracut_tarball(output: Path) -> Path:
    """``streamboot-client-dracut-<version>.tar.gz`` in ``output`` (``make install``)."""
    version = package_version()
    output.mkdir(parents=True, exist_ok=True)
    top = f"streamboot-client-dracut-{version}"
    path = output / f"{top}.tar.gz"

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, link: str = "") -> None:
        info = tarfile.TarInfo(f"{top}/{name}")
        info.size, info.mode, info.uname, info.gname = len(data), mode, "root", "root"
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info, io.BytesIO(data))

    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        add(tar, "Makefile", DRACUT_MAKEFILE.read_bytes(), 0o644)
        for src in _tree_files(PACKAGE_TREE, DRACUT_PATHS):
            name = str(src.relative_to(PACKAGE_TREE))
            if src.is_symlink():
                add(tar, name, b"", 0o777, str(src.readlink()))
            else:
                add(tar, name, src.read_bytes(), _mode(src))
    partial.rename(path)
    return path


def build_nbd_helper(out: Path) -> Path:
    """``streamboot-nbd`` (the attach-and-failover helper) compiled into ``out``: static,
    so the initramfs needs no libraries for it, and built on this machine for a client
    of the same architecture."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise PackageError("building streamboot-nbd needs a C compiler (apt-get install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [cc, "-static", "-Os", "-Wall", "-o", str(out), str(NBD_HELPER_SOURCE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise PackageError(f"compiling streamboot-nbd failed: {done.stderr.strip()[-2000:]}")
    return out
