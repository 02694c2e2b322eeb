"""A QEMU VM boots the demo Linux vdisk over NBD from the stream data plane and writes to it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import BlocksRequested, SessionAttached, SessionDetached
from tests.stream.conftest import ServerThread, sha256
from tests.vm.vm import boot_vm, qemu_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86 is not installed"),
]


def test_vm_boots_from_nbd_and_its_writes_stay_in_the_write_cache(
    demo_image: Path, tmp_path: Path
) -> None:
    before = sha256(demo_image)
    size = demo_image.stat().st_size
    spec = ExportSpec(
        session_id="vm-session",
        vdisk="demo",
        version=1,
        layers=(demo_image,),
        size=size,
        write_cache="server-disk",
    )
    server = ServerThread(
        {"vm-token": spec},
        StreamSettings(nbd_port=0, http_port=0, write_cache_dir=tmp_path, session_linger_s=60),
    )
    server.start()
    try:
        result = boot_vm(f"{server.nbd}/vm-token")
        lines = result.lines()
        assert any(line.startswith("BOOTED") for line in lines), result.console[-3000:]
        [wrote] = [line for line in lines if line.startswith("WROTE ")]
        record = wrote.removeprefix("WROTE ").encode()

        # The VM's write is in the session's write cache: a second connection of the same
        # session (it lingers after the VM's disconnect) reads it back at the scratch area.
        scratch = size - 1024 * 1024
        copy = tmp_path / "after.raw"
        subprocess.run(["nbdcopy", f"{server.nbd}/vm-token", str(copy)], check=True, timeout=60)
        with open(copy, "rb") as f:
            f.seek(scratch)
            assert f.read(len(record)) == record
        # ...and nowhere in the golden image.
        assert sha256(demo_image) == before
        with open(demo_image, "rb") as f:
            f.seek(scratch)
            assert f.read(len(record)) != record

        attached = server.events(SessionAttached)
        assert attached and all(e.session_id == "vm-session" for e in attached)
        assert server.events(SessionDetached)
        reads = [x for e in server.events(BlocksRequested) for x in e.extents if x[3] == "r"]
        writes = [x for e in server.events(BlocksRequested) for x in e.extents if x[3] == "w"]
        # The boot read the kernel and initrd (megabytes), and wrote the scratch record.
        assert sum(x[2] for x in reads) > 5 * 1024 * 1024
        assert any(x[1] <= scratch < x[1] + x[2] for x in writes)
    finally:
        server.stop()
