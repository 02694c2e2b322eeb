"""A session issued to one address: its NBD and HTTP exports refuse any other (a token seen
on the client's /proc/cmdline or screen opens nothing elsewhere). The refused client connects
from 127.0.0.2, a second loopback address; the allowed one is the real nbdinfo and curl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared import nbd_wire as W
from shared.events import SessionAddressRefused, SessionAttached
from tests.stream.conftest import ServerThread
from tests.stream.nbdraw import RawNbd

TOKEN = "tok-bound"


def serve(image: Path, tmp_path: Path, check: bool) -> ServerThread:
    size = image.stat().st_size
    spec = ExportSpec("s-bound", "demo", 1, (image,), size, "server-ram", client_addr="127.0.0.1")
    server = ServerThread(
        {TOKEN: spec},
        StreamSettings(
            nbd_port=0, http_port=0, write_cache_dir=tmp_path, client_address_check=check
        ),
    )
    server.start()
    return server


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "base.raw"
    path.write_bytes(b"streamboot" * 100_000 + bytes(-1_000_000 % 512))
    return path


@pytest.fixture
def bound(image: Path, tmp_path: Path) -> Iterator[ServerThread]:
    server = serve(image, tmp_path, check=True)
    yield server
    server.stop()


def test_nbd_refuses_another_address(bound: ServerThread) -> None:
    other = RawNbd(bound.servers.nbd_port, source="127.0.0.2")
    other.start()
    name = TOKEN.encode()
    other.option(W.OPT_GO, len(name).to_bytes(4, "big") + name + b"\0\0")
    _, rep, why = other.option_reply()
    assert rep == W.REP_ERR_POLICY and b"another address" in why
    [refused] = bound.events(SessionAddressRefused)  # drained first
    assert refused.client_addr == "127.0.0.2"  # type: ignore[attr-defined]
    assert refused.expected_addr == "127.0.0.1" and refused.protocol == "nbd"  # type: ignore[attr-defined]

    # The address it was issued to: the real client gets the export.
    info = subprocess.run(
        ["nbdinfo", "--size", f"{bound.nbd}/{TOKEN}"], capture_output=True, text=True, timeout=30
    )
    assert info.returncode == 0 and int(info.stdout) == 1_000_448, info.stderr
    attached = [e for e in bound.events(SessionAttached) if e.protocol == "nbd"]  # type: ignore[attr-defined]
    assert [e.client_addr.rsplit(":", 1)[0] for e in attached] == ["127.0.0.1"]  # type: ignore[attr-defined]


def test_http_refuses_another_address(bound: ServerThread) -> None:
    url = f"{bound.http}/s/{TOKEN}"

    def status(*extra: str) -> str:
        done = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-r", "0-9", *extra, url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return done.stdout

    assert status("--interface", "127.0.0.2") == "404"
    assert status() == "206"
    [refused] = bound.events(SessionAddressRefused)
    assert refused.protocol == "http" and refused.client_addr == "127.0.0.2"  # type: ignore[attr-defined]


def test_the_check_can_be_turned_off_for_nat_labs(image: Path, tmp_path: Path) -> None:
    server = serve(image, tmp_path, check=False)
    try:
        other = RawNbd(server.servers.nbd_port, source="127.0.0.2")
        size, _flags = other.go(TOKEN)
        assert size == 1_000_448
        assert server.events(SessionAddressRefused) == []
    finally:
        server.stop()
