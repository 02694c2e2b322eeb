"""A real firmware on the stream server: iPXE sanboot over the HTTP range server and over
iSCSI (QEMU, TCG).

* iPXE (``/boot/ipxe.lkrn`` from Debian's ``ipxe``, its script passed as initrd) runs
  ``sanboot http://10.0.2.2:PORT/s/<token>`` (slirp's 10.0.2.2 is the host's loopback): it
  takes the size from HEAD, reads blocks by Range and boots the image's MBR, a 20-byte
  boot sector that prints a marker on the serial port.
* The same with ``sanboot iscsi:10.0.2.2::PORT:0:iqn.2026-12.io.streamboot:<token>``: iPXE's
  own iSCSI initiator logs in, reads the capacity and the MBR.

Linux booting its disk over NBD is tested in tests/vm with the demo vdisk.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from services.stream.iscsi.server import TARGET_PREFIX
from shared.events import BlocksRequested, SessionAttached
from tests.stream.conftest import IMAGE_SIZE, ServerThread, spec

pytestmark = pytest.mark.slow

# xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8; .l: lodsb; or al,al; jz .h; out dx,al;
# jmp .l; .h: cli; hlt  -- then the message right after it, at 0x7c14.
BOOT_SECTOR_CODE = bytes.fromhex("31C08ED8BE147CBAF803AC08C07403EEEBF8FAF4")
MBR_MARKER = b"STREAMBOOT-MBR-OK"


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server(session_linger_s=5.0)


def run_until(cmd: list[str], marker: bytes, timeout: float) -> bytes:
    """Run a VM until ``marker`` shows on its console (or it exits / times out)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while marker not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait(10)
    return out


@pytest.mark.parametrize("proto", ["http", "iscsi"])
def test_ipxe_sanboot(server: ServerThread, tmp_path: Path, proto: str) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not Path("/boot/ipxe.lkrn").exists():
        pytest.skip("needs qemu-system-x86 and ipxe")
    sector = BOOT_SECTOR_CODE + MBR_MARKER + b"\r\n\0"
    image = tmp_path / "boot.raw"
    image.write_bytes(
        sector + bytes(510 - len(sector)) + b"\x55\xaa" + os.urandom(IMAGE_SIZE - 512)
    )
    token = f"tok-ipxe-{proto}"
    server.resolver.exports[token] = spec(token, {"base": image}, write_cache="client-ram")
    uri = {
        "http": f"http://10.0.2.2:{server.servers.http_port}/s/{token}",
        # iscsi:<server>:<protocol>:<port>:<LUN>:<target name> (iPXE's own initiator)
        "iscsi": f"iscsi:10.0.2.2::{server.servers.iscsi_port}:0:{TARGET_PREFIX}{token}",
    }[proto]
    script = tmp_path / "boot.ipxe"
    script.write_text(f"#!ipxe\ndhcp\nsanboot {uri}\n")
    out = run_until(
        [qemu, "-m", "128", "-nographic", "-no-reboot", "-kernel", "/boot/ipxe.lkrn",
         "-initrd", str(script), "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
        MBR_MARKER, timeout=120,
    )  # fmt: skip
    assert MBR_MARKER in out, out.decode(errors="replace")[-3000:]
    sid = f"session-{token}"
    assert any(e.session_id == sid and e.protocol == proto for e in server.events(SessionAttached))

    def mbr_read() -> bool:
        reads = [
            x for e in server.events(BlocksRequested) if e.session_id == sid for x in e.extents
        ]
        return any(off == 0 and op == "r" for _, off, _, op in reads)  # the MBR

    # BlocksRequested goes out in batches (each second, or when the client leaves).
    deadline = time.monotonic() + 10
    while not mbr_read() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mbr_read()
