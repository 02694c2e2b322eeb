"""Fixtures of the Linux client tests: the packages built once, the cached Debian root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamboot.client_package import PACKAGE_TREE
from streamboot.debian_image import DEFAULT_MIRROR, cached_root, packages_for

STREAMBOOT = Path(sys.executable).parent / "streamboot"
TEST_CACHE = Path(
    os.environ.get("STREAMBOOT_TEST_CACHE", Path.home() / ".cache" / "streamboot-test")
)


def debian_root() -> Path | None:
    """The debootstrapped bookworm that `vdisk build-debian` caches for the tests, if made."""
    root = cached_root(TEST_CACHE, "bookworm", DEFAULT_MIRROR, packages_for(()))
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """`streamboot client package --output DIR`: its output lines (the .deb last)."""
    out = tmp_path_factory.mktemp("client-package")
    done = subprocess.run(
        [str(STREAMBOOT), "client", "package", "--output", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [Path(line) for line in done.stdout.splitlines()]


DRACUT = Path("/usr/lib/dracut")
DRACUT_MODULE = PACKAGE_TREE / "usr/lib/dracut/modules.d/90streamboot"
CORE = PACKAGE_TREE / "usr/lib/streamboot/client.sh"


def dracut_missing() -> str | None:
    if shutil.which("dracut") is None or not (DRACUT / "modules.d/40network").is_dir():
        return "needs dracut-core and dracut-network"
    return None


def build_dracut(out: Path, work: Path, *args: str) -> None:
    """Run dracut with the package's module beside its own (a tree of symlinks in
    ``work``: nothing is installed on this machine), the core from the repo."""
    base = work / "dracut"
    (base / "modules.d").mkdir(parents=True)
    for entry in DRACUT.iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for module in (DRACUT / "modules.d").iterdir():
        (base / "modules.d" / module.name).symlink_to(module)
    (base / "modules.d" / DRACUT_MODULE.name).symlink_to(DRACUT_MODULE)
    (work / "conf.d").mkdir()
    env = dict(os.environ, dracutbasedir=str(base), STREAMBOOT_CORE=str(CORE))
    done = subprocess.run(
        ["dracut", "--no-hostonly", "--no-hostonly-cmdline", "--conf", "/dev/null",
         "--confdir", str(work / "conf.d"), "--tmpdir", str(work), "--no-early-microcode",
         "--force", *args, str(out)],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
