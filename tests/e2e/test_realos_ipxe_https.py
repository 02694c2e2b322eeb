"""A real iPXE fetches its boot script over HTTPS from streamboot's boot HTTP server behind
stunnel, trusting only the lab's own CA (docs/security.md, "HTTPS for iPXE").

Debian's iPXE (1.0.0+git-20190125) is built without HTTPS (its banner's features: DNS HTTP
iSCSI NFS TFTP SRP AoE ELF MBOOT PXE bzImage Menu PXEXT), so the test builds iPXE from its
sources as the docs say: ``DOWNLOAD_PROTO_HTTPS``, ``TRUST=`` and ``CERT=`` the CA, plus a
serial console for the test to read. The source is ``STREAMBOOT_TEST_IPXE_GIT`` (a git
repository: upstream by default) at IPXE_COMMIT; the build and its CA are kept in
~/.cache/streamboot-test/ipxe-https/ (the first build takes minutes).

The VM runs ``ipxe.lkrn`` with ``dhcp && chain https://.../ipxe/boot.ipxe`` (what an
embedded script would say; QEMU's user network: the host is 10.0.2.2). The boot HTTP
server is streamboot's (services/boot/http_server.py) with the boot service's own entry
script, its base URL the proxy's ``https://`` one; the per-client script it chains to
comes from the registry in a real system, here from the test (the registry is not what is
tested). Then the same with a proxy certificate from another CA: iPXE refuses it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.boot.boot_http import BootHttp
from services.boot.http_server import HttpServer, Request, Response
from streamboot.embedded.proc import free_port
from tests.client.conftest import TEST_CACHE

IPXE_GIT = os.environ.get("STREAMBOOT_TEST_IPXE_GIT", "https://github.com/ipxe/ipxe")
IPXE_COMMIT = "0ab2277c40f1de56c736b9e7db7ee23d52509ec5"
TOOLS = ("git", "make", "gcc", "perl", "openssl", "stunnel", "qemu-system-x86_64")
MISSING = [t for t in TOOLS if not shutil.which(t)]
MAC = "52:54:00:12:34:56"
HOST = "10.0.2.2"  # the host, as QEMU's user network shows it to the guest
VM_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realos,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING}"),
]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    """An RSA CA (iPXE verifies RSA) in ``d``: ca-cert.pem, ca-key.pem."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-subj", f"/CN={name}")  # fmt: skip


def server_pem(ca: Path, out: Path) -> Path:
    """A server certificate for HOST signed by the CA in ``ca``, with its key: stunnel's."""
    key, csr, cert, ext = (out / n for n in ("key.pem", "req.csr", "cert.pem", "ext.cnf"))
    out.mkdir(parents=True, exist_ok=True)
    ext.write_text(f"subjectAltName=IP:{HOST}\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={HOST}")  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"), "-CAkey",
            str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "3650", "-out", str(cert),
            "-extfile", str(ext))  # fmt: skip
    pem = out / "server.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return pem


@pytest.fixture(scope="module")
def ipxe_https() -> tuple[Path, Path]:
    """(ipxe.lkrn with HTTPS trusting only the cached CA, that CA's folder)."""
    root = TEST_CACHE / "ipxe-https" / IPXE_COMMIT[:12]
    lkrn, ca = root / "ipxe.lkrn", root / "ca"
    if lkrn.exists():
        return lkrn, ca
    if not (ca / "ca-key.pem").exists():
        make_ca(ca, "streamboot test iPXE CA")
    src = root / "ipxe"
    if not (src / "src" / "Makefile").exists():
        shutil.rmtree(src, ignore_errors=True)
        subprocess.run(["git", "clone", "--quiet", IPXE_GIT, str(src)], check=True)
        subprocess.run(["git", "-C", str(src), "checkout", "--quiet", IPXE_COMMIT], check=True)
    local = src / "src" / "config" / "local"
    local.mkdir(parents=True, exist_ok=True)
    (local / "general.h").write_text("#define DOWNLOAD_PROTO_HTTPS\n")
    (local / "console.h").write_text("#define CONSOLE_SERIAL\n")
    cert = ca / "ca-cert.pem"
    subprocess.run(
        ["make", "-C", str(src / "src"), f"-j{os.cpu_count() or 1}", "bin/ipxe.lkrn",
         "NO_WERROR=1", f"TRUST={cert}", f"CERT={cert}"],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.copy(src / "src" / "bin" / "ipxe.lkrn", lkrn)
    return lkrn, ca


class Seen:
    """The boot HTTP server with the boot service's entry script; what it was asked."""

    def __init__(self, base_url: str) -> None:
        self.boot = BootHttp(None, None, lambda _e: None, base_url=base_url)  # type: ignore[arg-type]
        self.paths: list[str] = []

    async def __call__(self, request: Request) -> Response:
        self.paths.append(f"{request.path}?mac={request.query.get('mac', '')}")
        if request.path == "/ipxe/script":  # the registry's per-client script in a system
            return Response(200, f"#!ipxe\necho streamboot-https-script {request.query['mac']}\n")
        return await self.boot(request)


@pytest.fixture
async def boot_http() -> AsyncIterator[tuple[HttpServer, Seen, int]]:
    """streamboot's boot HTTP server on loopback and the port its proxy will take."""
    proxy_port = free_port()
    seen = Seen(f"https://{HOST}:{proxy_port}")
    server = HttpServer(seen, "127.0.0.1", 0)
    await server.start()
    try:
        yield server, seen, proxy_port
    finally:
        await server.stop()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stunnel(tmp: Path, pem: Path, accept: int, connect: int) -> subprocess.Popen[bytes]:
    """stunnel as docs/security.md configures it, in the foreground."""
    conf = tmp / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[boot]\naccept = 127.0.0.1:{accept}\n"
        f"connect = 127.0.0.1:{connect}\ncert = {pem}\n"
    )
    proc = subprocess.Popen(
        ["stunnel", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    for _ in range(100):
        if listening(accept):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("stunnel does not listen")


def serial_text(serial: Path) -> str:
    return serial.read_text(errors="replace") if serial.exists() else ""


async def run_vm(lkrn: Path, proxy_port: int, serial: Path, until: str) -> str:
    """iPXE in a VM chaining to the proxy; its serial output once ``until`` shows (or it
    ends, or VM_TIMEOUT_S passes)."""
    script = f"dhcp && chain https://{HOST}:{proxy_port}/ipxe/boot.ipxe"
    vm = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-kernel", str(lkrn), "-append", script,
        "-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=",
        "-display", "none", "-serial", f"file:{serial}", "-m", "256", "-no-reboot",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(VM_TIMEOUT_S * 4):
            text = serial_text(serial)
            if until in text or vm.returncode is not None:
                return text
            await asyncio.sleep(0.25)
        return serial_text(serial)
    finally:
        if vm.returncode is None:
            vm.kill()
        await vm.wait()


async def test_ipxe_fetches_its_scripts_over_https_trusting_only_its_ca(
    ipxe_https: tuple[Path, Path], boot_http: tuple[HttpServer, Seen, int], tmp_path: Path
) -> None:
    lkrn, ca = ipxe_https
    server, seen, proxy_port = boot_http
    proxy = stunnel(tmp_path, server_pem(ca, tmp_path / "cert"), proxy_port, server.port)
    try:
        text = await run_vm(
            lkrn, proxy_port, tmp_path / "serial.log", f"streamboot-https-script {MAC}"
        )
    finally:
        proxy.kill()
        proxy.wait()
    assert "HTTPS" in text, text[-2000:]  # the build's banner lists it
    # The entry script came over HTTPS and ran (its echo), and its chain to the per-client
    # script, built from the https:// base URL with iPXE's ${mac}, came over HTTPS too.
    assert f"streamboot: asking the boot server for {MAC}" in text, text[-2000:]
    assert f"streamboot-https-script {MAC}" in text, text[-2000:]
    assert seen.paths == ["/ipxe/boot.ipxe?mac=", f"/ipxe/script?mac={MAC}"]


async def test_ipxe_refuses_a_proxy_certificate_from_another_ca(
    ipxe_https: tuple[Path, Path], boot_http: tuple[HttpServer, Seen, int], tmp_path: Path
) -> None:
    lkrn, _ = ipxe_https
    server, seen, proxy_port = boot_http
    other = tmp_path / "other-ca"
    make_ca(other, "someone else")
    proxy = stunnel(tmp_path, server_pem(other, tmp_path / "cert"), proxy_port, server.port)
    try:
        text = await run_vm(lkrn, proxy_port, tmp_path / "serial.log", "Permission denied")
    finally:
        proxy.kill()
        proxy.wait()
    assert f"https://{HOST}:{proxy_port}/ipxe/boot.ipxe... Permission denied" in text, text[-2000:]
    assert seen.paths == []  # nothing reached the boot HTTP server
