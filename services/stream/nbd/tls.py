"""NBD over TLS: the ``NBD_OPT_STARTTLS`` option, the policy of ``STREAMBOOT_STREAM_NBD_TLS``
and the node's X.509 credentials.

Modes: ``off`` (STARTTLS answered ``NBD_REP_ERR_UNSUP``), ``on`` (a client may upgrade, a
plain one is served too) and ``require`` (before the upgrade every option but STARTTLS and
ABORT is refused with ``NBD_REP_ERR_TLS_REQD``; ``NBD_OPT_EXPORT_NAME``, which has no error
reply, ends the connection). The certificate and key are the operator's
(``STREAMBOOT_STREAM_NBD_TLS_CERT`` / ``_KEY``) or, when unset, made once under
``DATA_DIR/stream/tls``: a CA (``ca-cert.pem``, what clients are given) and a server
certificate it signs for the node's names and addresses, the file names GnuTLS clients
(libnbd's ``tls-certificates=DIR``, QEMU's ``tls-creds-x509,dir=DIR``) look for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from services.stream.nbd import protocol as P
from services.stream.nbd import tls_psk
from shared import nbd_wire as W

if TYPE_CHECKING:
    from services.stream.nbd.server import NbdConnection

log = logging.getLogger(__name__)

Mode = Literal["off", "on", "require"]
REP_ERR_TLS_REQD = 0x80000005
CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
NAMES = "server-names"  # the names the server certificate was made for
DAYS = "3650"
# Options a client may send before its upgrade under `require`.
BEFORE_TLS = frozenset({W.OPT_STARTTLS, W.OPT_ABORT})


@dataclass(frozen=True)
class NbdTls:
    mode: Mode
    context: ssl.SSLContext


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def setup(
    mode: Mode,
    cert: Path | None,
    key: Path | None,
    default_dir: Path,
    hosts: list[str],
    psk_file: Path | None = None,
) -> NbdTls | None:
    """The node's TLS, or None when off; the operator's files, else the made ones; with
    ``psk_file``, clients may authenticate by a pre-shared key instead (tls_psk.py)."""
    if mode == "off":
        return None
    if (cert is None) != (key is None):
        raise ValueError("STREAMBOOT_STREAM_NBD_TLS_CERT and _KEY go together")
    if cert is None or key is None:
        cert, key = default_credentials(default_dir, hosts)
    context = server_context(cert, key)
    if psk_file is not None:
        tls_psk.install(context, tls_psk.read_keys(psk_file))
    return NbdTls(mode, context)


# --- the embedded default's credentials ----------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _san(hosts: list[str]) -> str:
    names: list[str] = []
    for h in dict.fromkeys(hosts):
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            names.append(f"DNS:{h}")
        else:
            if not ip.is_unspecified:
                names.append(f"IP:{ip}")
    return ",".join(names)


def default_credentials(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """The CA (made once) and a server certificate for ``hosts`` (made again when they
    change): what a node uses when the operator gives no certificate."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    hosts = [*hosts, "localhost", "127.0.0.1", socket.gethostname()]
    san = _san(hosts)
    ca_cert, ca_key = directory / CA_CERT, directory / CA_KEY
    cert, key, names = directory / SERVER_CERT, directory / SERVER_KEY, directory / NAMES
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    if not (ca_cert.exists() and ca_key.exists()):
        _openssl(
            "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", DAYS,
            "-subj", f"/CN=streamboot NBD CA ({socket.gethostname()})",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        ca_key.chmod(0o600)
        cert.unlink(missing_ok=True)
    if cert.exists() and key.exists() and names.exists() and names.read_text() == san:
        return cert, key
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        csr, ext = Path(tmp) / "server.csr", Path(tmp) / "ext.cnf"
        ext.write_text(
            f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", DAYS, "-extfile", str(ext),
        )  # fmt: skip
    key.chmod(0o600)
    names.write_text(san)
    log.info("stream: NBD TLS certificate made for %s (CA: %s)", san, ca_cert)
    return cert, key


# --- the handshake's hooks -----------------------------------------------------------------


async def option(conn: NbdConnection, tls: NbdTls, opt: int, data: bytes) -> bool | None:
    """STARTTLS, or the refusal of a plain option under ``require``: True when the
    handshake is over (the connection closed), False when it goes on, None when the option
    is not TLS's business."""
    if opt == W.OPT_STARTTLS:
        return await _starttls(conn, tls, data)
    if tls.mode != "require" or conn.tls_active or opt in BEFORE_TLS:
        return None
    if opt == W.OPT_EXPORT_NAME:  # no error reply exists for it: the spec says disconnect
        conn.close("tls-required")
        return True
    conn.write(P.option_reply(opt, REP_ERR_TLS_REQD))
    return False


async def _starttls(conn: NbdConnection, tls: NbdTls, data: bytes) -> bool:
    if data or conn.tls_active:
        conn.write(P.option_reply(W.OPT_STARTTLS, W.REP_ERR_INVALID))
        return False
    if conn.buf:  # the client may send nothing until our ACK: it is not speaking NBD
        conn.close("starttls-pipelined")
        return True
    conn.write(P.option_reply(W.OPT_STARTTLS, W.REP_ACK))
    loop = asyncio.get_running_loop()
    try:
        transport = await loop.start_tls(
            conn.transport, conn, tls.context, server_side=True,
            ssl_handshake_timeout=conn.settings.handshake_timeout_s or None,
        )  # fmt: skip
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
        log.info("nbd %s: TLS handshake failed: %s", conn.peer, e)
        conn.abort("tls-handshake-failed")
        return True
    if transport is None:  # the peer left during the handshake
        conn.abort("tls-handshake-failed")
        return True
    conn.transport = transport
    conn.tls_active = True
    return False
