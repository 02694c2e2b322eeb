"""The Linux client's hand-off: the initramfs brings up the NIC, redeems the nonce on its
kernel command line for its session's export, attaches it with nbd-client and uses it.

QEMU's user-mode network stands in for the LAN here: the guest reaches the host's loopback
servers at 10.0.2.2. The full PXE chain on a bridge is the boot service's end-to-end test.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import BlocksRequested
from streamboot.demo.image import build_demo_image
from tests.stream.conftest import ServerThread
from tests.vm.vm import boot_vm, qemu_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.skipif(
        not qemu_available() or not shutil.which("nbd-client"),
        reason="needs qemu-system-x86 and nbd-client",
    ),
]
MAC = "52:54:00:12:34:56"
HOST_FROM_GUEST = "10.0.2.2"


NONCE = "n0nce-for-this-vm-only"


class Handoff:
    """A stand-in boot service answering the redeem of one nonce, once (the real one is
    tested against the registry in tests/boot)."""

    def __init__(self, answer: str) -> None:
        self.asked: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                key = query.get("nonce" if url.path == "/session/redeem" else "mac", [""])[0]
                outer.asked.append((url.path, key))
                ok = (url.path, key) in (("/session/redeem", NONCE), ("/booted", MAC))
                reply = answer if url.path == "/session/redeem" else "ok\n"
                body = (reply if ok else "nonce unknown\n").encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]


@pytest.fixture
def stream(demo_image: Path, tmp_path: Path) -> Iterator[ServerThread]:
    size = demo_image.stat().st_size
    exports = {
        f"tok-{kind}": ExportSpec(f"s-{kind}", "demo", 1, (demo_image,), size, kind)
        for kind in ("server-disk", "client-ram")
    }
    server = ServerThread(
        exports, StreamSettings(nbd_port=0, http_port=0, write_cache_dir=tmp_path)
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("write_cache", ["server-disk", "client-ram"])
def test_initramfs_hands_off_to_nbd(
    stream: ServerThread, demo_image: Path, tmp_path: Path, write_cache: str
) -> None:
    port = stream.servers.nbd_port
    handoff = Handoff(
        f"nbd_host={HOST_FROM_GUEST}\nnbd_port={port}\nexport=tok-{write_cache}\n"
        f"write_cache={write_cache}\n"
    )
    # The firmware phase: a local copy of the vdisk whose kernel line is what the boot
    # service's kernel-direct script would write.
    firmware_disk = build_demo_image(
        tmp_path / "firmware.img",
        cache_dir=demo_image.parent / "kernel",
        kernel_args=(
            f"streamboot.server=http://{HOST_FROM_GUEST}:{handoff.port} streamboot.nonce={NONCE}"
        ),
    )
    result = boot_vm(
        str(firmware_disk),
        extra=["-nic", f"user,model=virtio-net-pci,mac={MAC}"],
        replace_nic=True,
    )
    lines = result.lines()
    assert any(line.startswith("BOOTED") for line in lines), result.console[-3000:]
    # It redeemed its nonce, then said it had booted.
    assert handoff.asked == [("/session/redeem", NONCE), ("/booted", MAC)]
    assert (
        f"attached nbd://{HOST_FROM_GUEST}:{port} as /dev/nbd0 (write cache {write_cache})" in lines
    )
    assert any(line.startswith("disk /dev/nbd0 size") for line in lines), lines
    assert any(line.startswith("WROTE ") for line in lines), lines
    if write_cache == "client-ram":
        assert "overlay over the read-only export (RAM)" in lines
        stream.wait_idle()
        writes = [x for e in stream.events(BlocksRequested) for x in e.extents if x[3] == "w"]
        assert writes == []  # the export was read-only: every write stayed in the client's RAM
    else:
        [wrote] = [line for line in lines if line.startswith("WROTE ")]
        record = wrote.removeprefix("WROTE ").encode()
        scratch = demo_image.stat().st_size - 1024 * 1024
        # A session's extents are reported in timed batches: wait for the batch with the write.
        deadline = time.monotonic() + 30
        while not any(
            x[1] <= scratch < x[1] + x[2] and x[3] == "w"
            for e in stream.events(BlocksRequested)
            for x in e.extents
        ):
            assert time.monotonic() < deadline, "no BlocksRequested event reports the write"
            time.sleep(0.2)
        copy = tmp_path / "after.raw"
        subprocess.run(["nbdcopy", f"{stream.nbd}/tok-{write_cache}", str(copy)], check=True)
        with open(copy, "rb") as f:
            f.seek(scratch)
            assert f.read(len(record)) == record
