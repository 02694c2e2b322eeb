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

from services.boot.ipxe_scripts import IscsiBoot, SessionInfo, iscsi_sanboot_script
from services.stream.iscsi.server import TARGET_PREFIX
from services.stream.spec import ChapSecrets
from shared.events import BlocksRequested, IscsiLoginRefused, SessionAttached
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


def boot_image(tmp_path: Path) -> Path:
    sector = BOOT_SECTOR_CODE + MBR_MARKER + b"\r\n\0"
    image = tmp_path / "boot.raw"
    image.write_bytes(
        sector + bytes(510 - len(sector)) + b"\x55\xaa" + os.urandom(IMAGE_SIZE - 512)
    )
    return image


def ipxe_vm(script: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not Path("/boot/ipxe.lkrn").exists():
        pytest.skip("needs qemu-system-x86 and ipxe")
    return [qemu, "-m", "128", "-nographic", "-no-reboot", "-kernel", "/boot/ipxe.lkrn",
            "-initrd", str(script), "-netdev", "user,id=n0", "-device",
            "virtio-net-pci,netdev=n0"]  # fmt: skip


@pytest.mark.parametrize("proto", ["http", "iscsi"])
def test_ipxe_sanboot(server: ServerThread, tmp_path: Path, proto: str) -> None:
    image = boot_image(tmp_path)
    token = f"tok-ipxe-{proto}"
    server.resolver.exports[token] = spec(token, {"base": image}, write_cache="client-ram")
    uri = {
        "http": f"http://10.0.2.2:{server.servers.http_port}/s/{token}",
        # iscsi:<server>:<protocol>:<port>:<LUN>:<target name> (iPXE's own initiator)
        "iscsi": f"iscsi:10.0.2.2::{server.servers.iscsi_port}:0:{TARGET_PREFIX}{token}",
    }[proto]
    script = tmp_path / "boot.ipxe"
    script.write_text(f"#!ipxe\ndhcp\nsanboot {uri}\n")
    out = run_until(ipxe_vm(script), MBR_MARKER, timeout=120)
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


@pytest.mark.parametrize("right", [True, False], ids=["secret", "wrong-secret"])
def test_ipxe_iscsi_script_with_mutual_chap(
    server: ServerThread, tmp_path: Path, right: bool
) -> None:
    """The boot service's own sanboot-iscsi script (initiator name, CHAP both ways) run by
    iPXE: with the device's secrets it boots; with a wrong one the login is refused (an
    IscsiLoginRefused) and the script says so."""
    token = f"tok-ipxe-chap-{right}"
    chap = ChapSecrets("pc-0042", "s3cret-0042-ab", "streamboot", "target-secret-99")
    server.resolver.exports[token] = spec(
        token, {"base": boot_image(tmp_path)}, write_cache="client-ram", chap=chap,
        initiator_iqn="iqn.2026-12.io.streamboot.client:525400000042",
    )  # fmt: skip
    given = {"user": chap.user, "secret": chap.secret if right else "not-the-secret-1",
             "reverse_user": chap.reverse_user, "reverse_secret": chap.reverse_secret}  # fmt: skip
    boot = IscsiBoot(f"10.0.2.2:{server.servers.iscsi_port}", TARGET_PREFIX + token,
                     "iqn.2026-12.io.streamboot.client:525400000042", given)  # fmt: skip
    generated = iscsi_sanboot_script(SessionInfo("golden", 1, ""), boot, retry_url="http://x/")
    assert "set reverse-password target-secret-99" in generated
    script = tmp_path / "boot.ipxe"
    # iPXE from a PXE ROM has its address already; ipxe.lkrn asks DHCP first.
    script.write_text(generated.replace("#!ipxe\n", "#!ipxe\ndhcp\n", 1))
    marker = MBR_MARKER if right else b"iSCSI sanboot failed"
    out = run_until(ipxe_vm(script), marker, timeout=120)
    assert marker in out, out.decode(errors="replace")[-3000:]
    sid = f"session-{token}"
    attached = any(e.session_id == sid for e in server.events(SessionAttached))
    refused = [e for e in server.events(IscsiLoginRefused) if e.session_id == sid]
    assert attached == right and bool(refused) != right, refused
    assert all(e.status == 0x0201 and e.initiator.endswith("525400000042") for e in refused)
