"""The fault suite's system: one `streamboot up` per module, the live client's netns, the
small write-cache file system (tests/faults/system.py). Needs root (netns, tmpfs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import traversable_tmpdir
from tests.faults.system import ClientNet, RamFs, System


@pytest.fixture(scope="module")
def system() -> Iterator[tuple[System, ClientNet, RamFs]]:
    if os.geteuid() != 0:
        pytest.skip("the fault suite needs root (a network namespace, a tmpfs)")
    root = traversable_tmpdir("streamboot-faults-")
    net = ClientNet()
    ram = None
    system = None
    try:
        ram = RamFs(root / "ram")
        system = System(root / "dd", net.host_ip, ram.path)
        yield system, net, ram
    finally:
        try:
            if system is not None:
                system.stop()  # fails on a permission violation NATS logged
        finally:
            if ram is not None:
                ram.close()
            net.close()
            shutil.rmtree(root, ignore_errors=True)
