"""Record the seed corpora from real clients and tools (run once; the files are committed).

    uv run python -m tests.fuzz.make_corpus [TARGET...]

nbd: what ``qemu-img info`` / ``nbdinfo`` / ``qemu-io`` send to the fuzz target's stream
server, through a recording proxy; iscsi: what ``iscsi-inq`` / ``iscsi-readcapacity16`` /
``iscsi-ls`` / ``qemu-io`` send to its iSCSI target; http_head: ``curl`` request heads; tftp: the RRQs of
``tftp`` (tftp-hpa) and ``atftp``; dhcp: a ``udhcpc`` DISCOVER; event: envelopes of real
events; vdisk_layout: a delta map written by ``write_delta``; partitions: the first sectors
of ``sfdisk``-made MBR (with logical partitions) and GPT images.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from services.stream.iscsi.server import TARGET_PREFIX
from shared.events import BootMenuShown, BootRequested, SessionClosed, envelope
from shared.vdisk_layout import write_delta
from tests.fuzz.targets import NBD_TOKEN, _NbdServer

CORPUS = Path(__file__).parent / "corpus"


def save(name: str, data: bytes) -> None:
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def record_tcp(upstream_port: int, client: list[str], limit: int = 4096) -> bytes:
    """Run ``client`` (``{port}`` replaced) against a proxy to ``upstream_port``; return the
    first ``limit`` bytes the client sent."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    sent = bytearray()

    def proxy() -> None:
        c, _ = lst.accept()
        u = socket.create_connection(("127.0.0.1", upstream_port))

        def pump(a: socket.socket, b: socket.socket, keep: bool) -> None:
            try:
                while data := a.recv(65536):
                    if keep:
                        sent.extend(data)
                    b.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(u, c, False))
        t.start()
        pump(c, u, True)
        t.join(10)
        c.close()
        u.close()

    t = threading.Thread(target=proxy)
    t.start()
    subprocess.run(
        [a.replace("{port}", str(port)) for a in client], capture_output=True, timeout=30
    )
    t.join(10)
    lst.close()
    return bytes(sent[:limit])


def nbd() -> None:
    server = _NbdServer.get()
    uri = f"nbd://127.0.0.1:{{port}}/{NBD_TOKEN}"
    for client in (
        ["qemu-img", "info", "-f", "raw", uri],
        ["nbdinfo", uri],
        ["nbdinfo", "--map", uri],
        ["qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "write -P 7 512 1k", "-c", "flush",
         "-c", "write -z 8k 4k", "-c", "discard 64k 4k", uri],
    ):  # fmt: skip
        save("nbd", record_tcp(server.port, client))


def iscsi() -> None:
    """What libiscsi's tools and QEMU's iSCSI driver send to the same server's target."""
    server = _NbdServer.get()
    url = f"iscsi://127.0.0.1:{{port}}/{TARGET_PREFIX}{NBD_TOKEN}/0"
    for client in (
        ["iscsi-inq", url],
        ["iscsi-readcapacity16", url],
        ["iscsi-ls", "-s", "iscsi://127.0.0.1:{port}"],
        ["qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "write -P 7 512 1k", "-c", "flush",
         "-c", "write -z 8k 4k", "-c", "discard 64k 4k", url],
    ):  # fmt: skip
        save("iscsi", record_tcp(server.iscsi_port, client, limit=8192))


def http_head() -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    for args in (["-r", "0-99"], ["-I"], ["-H", "Range: bytes=-512"], []):
        got = bytearray()

        def serve(got: bytearray = got) -> None:
            c, _ = lst.accept()
            while b"\r\n\r\n" not in got and (data := c.recv(4096)):
                got.extend(data)
            c.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            c.close()

        t = threading.Thread(target=serve)
        t.start()
        subprocess.run(["curl", "-s", *args, f"http://127.0.0.1:{port}/boot/kernel"], timeout=10)
        t.join(10)
        save("http_head", bytes(got))
    lst.close()


def tftp() -> None:
    for cmd in (
        ["tftp", "127.0.0.1", "{port}", "-m", "binary", "-c", "get", "pxelinux.0", "/dev/null"],
        ["atftp", "--option", "blksize 1428", "--option", "tsize 0", "--option",
         "windowsize 16", "-g", "-r", "ipxe.efi", "-l", "/dev/null", "127.0.0.1", "{port}"],
    ):  # fmt: skip
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        p = subprocess.Popen([a.replace("{port}", str(port)) for a in cmd], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        s.settimeout(10)
        data, peer = s.recvfrom(65536)
        save("tftp", data)
        s.sendto(b"\x00\x05\x00\x01File not found\x00", peer)
        p.kill()
        p.wait()
        s.close()
    save("tftp", b"\x00\x04\x00\x01")  # an ACK
    save("tftp", b"\x00\x06blksize\x001428\x00tsize\x00123\x00")  # an OACK


def dhcp() -> None:
    """A udhcpc DISCOVER, caught on a veth pair in a private network namespace."""
    ns = f"fuzzrec{os.getpid()}"
    sh = f"""
    set -e
    ip netns add {ns}
    trap 'ip netns del {ns}' EXIT
    ip -n {ns} link add va type veth peer name vb
    ip -n {ns} link set va up; ip -n {ns} link set vb up; ip -n {ns} link set lo up
    ip -n {ns} addr add 10.9.0.1/24 dev vb
    ip netns exec {ns} python3 -c '
import socket,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)
s.setsockopt(socket.SOL_SOCKET,25,b"vb")
s.bind(("0.0.0.0",67)); s.settimeout(10)
sys.stdout.buffer.write(s.recv(4096).hex().encode())' > {{out}} &
    sleep 0.5
    ip netns exec {ns} busybox udhcpc -i va -n -q -t 1 -T 1 -V PXEClient:Arch:00007 >/dev/null 2>&1 || true
    wait
    """
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(["bash", "-c", sh.replace("{out}", out.name)], timeout=60, check=True)
        save("dhcp", bytes.fromhex(Path(out.name).read_text()))


def nbd_options() -> None:
    """NBD_OPT_GO payloads as nbdinfo and qemu-img send them, and meta context queries."""
    for name, infos in ((b"fuzz-token", (3,)), (b"", ()), (b"a" * 300, (0, 1, 2, 3))):
        save("nbd_options", struct.pack(">I", len(name)) + name + struct.pack(
            f">H{len(infos)}H", len(infos), *infos))  # fmt: skip
    for queries in ((b"base:allocation",), (), (b"base:", b"qemu:dirty-bitmap:x")):
        body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
        save("nbd_options", struct.pack(">I", 10) + b"fuzz-token" + struct.pack(
            ">I", len(queries)) + body)  # fmt: skip


def event() -> None:
    for ev in (
        SessionClosed(session_id="s-1", reason="client-gone", bytes_read=4096),
        BootRequested(mac="52:54:00:12:34:56", arch=7, vdisk="debian", version=2),
        BootMenuShown(mac="52:54:00:12:34:56", vdisks=["debian", "demo"], default="demo"),
    ):
        save("event", envelope(ev).model_dump_json().encode())


def vdisk_layout() -> None:
    with tempfile.TemporaryDirectory() as d:
        base, new = Path(d) / "base.raw", Path(d) / "new.raw"
        data = bytearray(os.urandom(64 * 1024 + 100))
        base.write_bytes(data)
        data[100:200] = bytes(100)
        new.write_bytes(bytes(data) + os.urandom(70000))
        write_delta([base], new, Path(d) / "v2", block_size=4096)
        save("vdisk_layout", (Path(d) / "v2.map").read_bytes())


def partitions() -> None:
    with tempfile.TemporaryDirectory() as d:
        for label, script in (
            ("dos", "label: dos\nstart=8,size=30,type=83\nstart=40,size=400,type=5\n"
                    "start=42,size=50,type=83\nstart=100,size=50,type=c\n"),
            ("gpt", "label: gpt\nstart=40,size=100,type=L\nstart=200,size=100,type=U\n"),
        ):  # fmt: skip
            img = Path(d) / f"{label}.img"
            with open(img, "wb") as f:
                f.truncate(1 << 20)
            subprocess.run(["sfdisk", "-q", str(img)], input=script, text=True, check=True)
            raw = img.read_bytes()
            if label == "dos":  # the MBR and the EBRs of the two logical partitions
                save("partitions", raw[:512])
                save("partitions", raw[: 160 * 512])
            else:
                save("partitions", raw[: 34 * 512])


if __name__ == "__main__":
    wanted = set(sys.argv[1:])  # target names; none: all
    for make in (nbd, nbd_options, iscsi, http_head, tftp, dhcp, event, vdisk_layout, partitions):
        if not wanted or make.__name__ in wanted:
            make()
            print(make.__name__, "done")
