"""Fixtures of the Linux client tests: the packages built once, the cached Debian root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
