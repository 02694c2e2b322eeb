"""NBD over TLS (services/stream/nbd/tls.py), driven by real clients: libnbd's nbdinfo and
nbdcopy (``nbds://``, ``tls-certificates=DIR``) and QEMU (``tls-creds-x509``).

`require` serves TLS clients and refuses plain ones (``NBD_REP_ERR_TLS_REQD``; an
``EXPORT_NAME`` client is disconnected), `on` serves both, `off` refuses STARTTLS; a client
that does not trust the node's CA gets nothing and the node goes on serving; the embedded
default's credentials are made under the data dir and made again for new host names.
"""

from __future__ import annotations

import shutil
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.stream.nbd import tls
from services.stream.settings import StreamSettings
from shared import nbd_wire as W
from shared.settings import Settings
from tests.stream.conftest import ServerThread, sha256
from tests.stream.nbdraw import RawNbd

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    tls.default_credentials(d, ["127.0.0.1"])
    return d


def serve(make_server: Any, creds: Path, mode: tls.Mode) -> ServerThread:
    return make_server(
        nbd_tls=tls.setup(mode, creds / tls.SERVER_CERT, creds / tls.SERVER_KEY, creds, [])
    )


def nbds(server: ServerThread, token: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{server.servers.nbd_port}/{token}?tls-certificates={creds}"


def qemu_opts(server: ServerThread, token: str) -> list[str]:
    port = server.servers.nbd_port
    return [
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
        f"export={token},tls-creds=tls0",
    ]


def qemu_creds(creds: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=check)


def test_require_serves_tls_clients_and_refuses_plain_ones(
    make_server: Any, creds: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    server = serve(make_server, creds, "require")
    info = run("nbdinfo", nbds(server, "tok-a", creds)).stdout
    assert "with TLS" in info and "export-size: 33554432" in info
    copy = tmp_path / "copy.raw"
    run("nbdcopy", nbds(server, "tok-v2", creds), str(copy))
    assert sha256(copy) == sha256(images["v2_full"])

    # QEMU's client writes and reads back through TLS.
    run(
        "qemu-io", *qemu_creds(creds), "-c", "write -P 0x3c 1M 64k", "-c", "flush",
        "-c", "read -P 0x3c 1M 64k", *qemu_opts(server, "tok-b"),
    )  # fmt: skip
    done = run("qemu-img", "info", *qemu_creds(creds), *qemu_opts(server, "tok-b"), "--output=json")
    assert '"virtual-size": 33554432' in done.stdout

    # Plain clients: refused, with the reason QEMU names.
    plain = run("qemu-img", "info", f"{server.nbd}/tok-a", check=False)
    assert plain.returncode != 0 and "TLS negotiation required" in plain.stderr, plain.stderr
    assert run("nbdinfo", f"{server.nbd}/tok-a", check=False).returncode != 0
    raw = RawNbd(server.servers.nbd_port)
    raw.start()
    name = b"tok-a"
    for opt, data in [
        (W.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)),
        (W.OPT_INFO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)),
        (W.OPT_STRUCTURED_REPLY, b""),
        (W.OPT_LIST, b""),
    ]:
        raw.option(opt, data)
        assert raw.option_reply() == (opt, tls.REP_ERR_TLS_REQD, b"")
    raw.option(W.OPT_STARTTLS, b"junk")  # STARTTLS takes no payload
    assert raw.option_reply() == (W.OPT_STARTTLS, W.REP_ERR_INVALID, b"")
    raw.option(W.OPT_EXPORT_NAME, name)  # no error reply exists: disconnected
    assert raw.closed_by_peer()
    raw.close()
    server.wait_idle()


def test_a_client_that_does_not_trust_the_ca_gets_nothing(
    make_server: Any, creds: Path, tmp_path: Path
) -> None:
    server = serve(make_server, creds, "require")
    other = tmp_path / "other"
    tls.default_credentials(other, ["127.0.0.1"])  # another CA
    failed = run("nbdinfo", nbds(server, "tok-a", other), check=False)
    assert failed.returncode != 0 and "export-size" not in failed.stdout
    # A client that upgrades and then sends no TLS handshake is dropped, not kept.
    raw = RawNbd(server.servers.nbd_port)
    raw.start()
    raw.option(W.OPT_STARTTLS)
    assert raw.option_reply() == (W.OPT_STARTTLS, W.REP_ACK, b"")
    raw.sock.sendall(b"this is not a TLS ClientHello" * 10)
    assert raw.closed_by_peer()
    raw.close()
    assert "with TLS" in run("nbdinfo", nbds(server, "tok-a", creds)).stdout


def test_on_serves_both_and_off_refuses_starttls(make_server: Any, creds: Path) -> None:
    server = serve(make_server, creds, "on")
    assert "with TLS" in run("nbdinfo", nbds(server, "tok-a", creds)).stdout
    assert "without TLS" in run("nbdinfo", f"{server.nbd}/tok-a").stdout
    off = make_server()
    refused = run("nbdinfo", nbds(off, "tok-a", creds), check=False)
    assert refused.returncode != 0
    raw = RawNbd(off.servers.nbd_port)
    raw.start()
    raw.option(W.OPT_STARTTLS)
    assert raw.option_reply() == (W.OPT_STARTTLS, W.REP_ERR_UNSUP, b"")
    raw.close()


def test_the_default_credentials_live_in_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "dd", stream_nbd_tls="require", public_host="10.9.8.7")
    st = StreamSettings.from_settings(s)
    assert st.nbd_tls is not None and st.nbd_tls.mode == "require"
    d = tmp_path / "dd" / "stream" / "tls"
    ca = (d / tls.CA_CERT).read_bytes()
    cert = (d / tls.SERVER_CERT).read_bytes()
    text = run("openssl", "x509", "-noout", "-text", "-in", str(d / tls.SERVER_CERT)).stdout
    assert "IP Address:10.9.8.7" in text and "IP Address:127.0.0.1" in text
    run("openssl", "verify", "-CAfile", str(d / tls.CA_CERT), str(d / tls.SERVER_CERT))
    # The same names: nothing made again; a new address: a new certificate, the same CA.
    StreamSettings.from_settings(s)
    assert (d / tls.SERVER_CERT).read_bytes() == cert
    StreamSettings.from_settings(
        Settings(data_dir=tmp_path / "dd", stream_nbd_tls="require", public_host="10.9.8.8")
    )
    assert (d / tls.SERVER_CERT).read_bytes() != cert and (d / tls.CA_CERT).read_bytes() == ca
    assert (d / tls.SERVER_KEY).stat().st_mode & 0o077 == 0
    # The operator's files are used as given; half a pair is refused.
    given = tmp_path / "given"
    shutil.copytree(d, given)
    mine = tls.setup("on", given / tls.SERVER_CERT, given / tls.SERVER_KEY, tmp_path / "x", [])
    assert mine is not None and isinstance(mine.context, ssl.SSLContext)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="go together"):
        tls.setup("on", given / tls.SERVER_CERT, None, tmp_path / "x", [])
