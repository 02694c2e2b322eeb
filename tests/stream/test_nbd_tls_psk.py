"""NBD over TLS with pre-shared keys (services/stream/nbd/tls_psk.py,
STREAMBOOT_STREAM_NBD_TLS_PSK_FILE), driven by real GnuTLS clients: libnbd's nbdinfo
(``tls-psk-file=``) and QEMU (``tls-creds-psk``). The node keeps its certificate for X.509
clients; a client with a wrong key or an unknown name gets nothing, and the node goes on
serving."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.stream.nbd import tls, tls_psk
from services.stream.settings import StreamSettings
from shared.settings import Settings
from tests.stream.conftest import IMAGE_SIZE, ServerThread

pytestmark = pytest.mark.timeout(300)
KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"


def psk_file(path: Path, name: str, key: str) -> Path:
    path.write_text(f"# psktool's format\n\n{name}:{key}\n")
    return path


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return psk_file(tmp_path / "keys.psk", "alice", KEY)


@pytest.fixture
def server(make_server: Any, keys: Path, tmp_path: Path) -> ServerThread:
    creds = tmp_path / "x509"
    nbd_tls = tls.setup("require", None, None, creds, ["127.0.0.1"], keys)
    return make_server(nbd_tls=nbd_tls)


def nbdinfo(server: ServerThread, user: str, keys: Path) -> subprocess.CompletedProcess[str]:
    uri = f"nbds://{user}@127.0.0.1:{server.servers.nbd_port}/tok-a?tls-psk-file={keys}"
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)


def test_gnutls_clients_with_the_key_are_served(
    server: ServerThread, keys: Path, tmp_path: Path
) -> None:
    got = nbdinfo(server, "alice", keys)
    assert got.returncode == 0 and got.stdout.strip() == str(IMAGE_SIZE), got.stderr
    # QEMU reads keys.psk from its creds dir.
    qdir = tmp_path / "qemu"
    qdir.mkdir()
    (qdir / "keys.psk").write_text(keys.read_text())
    port = server.servers.nbd_port
    info = subprocess.run(
        ["qemu-img", "info", "--output=json",
         "--object", f"tls-creds-psk,id=tls0,dir={qdir},username=alice,endpoint=client",
         "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
         f"server.port={port},export=tok-a,tls-creds=tls0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert info.returncode == 0 and f'"virtual-size": {IMAGE_SIZE}' in info.stdout, info.stderr
    # Certificate clients are still served by the same node.
    creds = tmp_path / "x509"
    uri = f"nbds://127.0.0.1:{port}/tok-a?tls-certificates={creds}"
    x509 = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    assert x509.returncode == 0, x509.stderr


def test_a_wrong_key_or_name_gets_nothing(server: ServerThread, keys: Path, tmp_path: Path) -> None:
    wrong = psk_file(tmp_path / "wrong.psk", "alice", OTHER)
    stranger = psk_file(tmp_path / "stranger.psk", "mallory", KEY)
    assert nbdinfo(server, "alice", wrong).returncode != 0
    assert nbdinfo(server, "mallory", stranger).returncode != 0
    got = nbdinfo(server, "alice", keys)  # the node goes on serving
    assert got.returncode == 0, got.stderr


@pytest.mark.parametrize(
    "text", ["alice", "alice:xyz", "alice:abc", ":00ff", "", "# only a comment\n"]
)
def test_a_malformed_key_file_is_refused_at_start(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.psk"
    path.write_text(text)
    with pytest.raises(tls_psk.PskError):
        tls_psk.read_keys(path)


def test_the_setting_reaches_the_node(keys: Path, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, stream_nbd_tls="require", stream_nbd_tls_psk_file=keys)  # type: ignore[call-arg]
    st = StreamSettings.from_settings(s)
    assert st.nbd_tls is not None and st.nbd_tls.mode == "require"
