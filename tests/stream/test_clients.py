"""Conformance of the NBD and HTTP range servers, judged by real clients.

qemu-img, qemu-io, nbdinfo, nbdcopy and curl talk to a StreamServers over loopback; every
read is compared with the image bytes, every write read back (through another connection of
the same session), and the image file itself must be unchanged at the end (fixture).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.events import BlocksRequested, SessionAttached, SessionDetached
from tests.stream.conftest import IMAGE_SIZE, ServerThread, sha256

TIMEOUT = 120


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # errors="replace": some tools print binary fields as they are (iscsi-inq's designators).
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=TIMEOUT)
    if check:
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    # qemu-io reports pattern mismatches on stdout but still exits 0.
    assert "Pattern verification failed" not in out.stdout + out.stderr, out.stdout
    assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    return out.stdout


TRANSPORTS = {
    # Our own transport as configured by default: large reads by sendfile...
    "sendfile": {"nbd_zero_copy": True},
    # ...the same copying every read (one preadv + sendmsg), as below a raised
    # STREAMBOOT_STREAM_NBD_ZERO_COPY_MIN_CONNECTIONS...
    "raw-copy": {"nbd_zero_copy": True, "nbd_zero_copy_min_connections": 1_000_000},
    # ...and uvloop's transports.
    "uvloop": {"nbd_zero_copy": False},
}


@pytest.fixture(scope="module", params=list(TRANSPORTS), ids=list(TRANSPORTS))
def server(make_server, request) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server(session_linger_s=60.0, **TRANSPORTS[request.param])


def test_qemu_img_info(server: ServerThread) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", f"{server.nbd}/tok-ro").stdout)
    assert info["virtual-size"] == IMAGE_SIZE


def test_qemu_img_convert_whole_export(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{server.nbd}/tok-ro", str(out))
    assert sha256(out) == sha256(images["base"])


def test_version_chain_served(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "v2.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{server.nbd}/tok-v2", str(out))
    assert sha256(out) == sha256(images["v2_full"])


def test_nbdcopy_export_to_file(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "copy.raw"
    # Several connections of one session, many requests in flight on each.
    run("nbdcopy", "--connections=4", "--requests=16", f"{server.nbd}/tok-v2", str(out))
    assert sha256(out) == sha256(images["v2_full"])


def test_nbdinfo_export_and_list(server: ServerThread) -> None:
    info = json.loads(run("nbdinfo", "--json", f"{server.nbd}/tok-a").stdout)
    export = info["exports"][0]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True and export["can_trim"] is True
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * 1024 * 1024
    ro = json.loads(run("nbdinfo", "--json", f"{server.nbd}/tok-ro").stdout)["exports"][0]
    assert ro["is_read_only"] is True
    # Export names are secret session tokens: the list is empty but the option works.
    listed = run("nbdinfo", "--list", "--json", server.nbd)
    assert json.loads(listed.stdout)["exports"] == []


def test_block_status_reports_zeroed_range(server: ServerThread) -> None:
    out = run("nbdinfo", "--map", "--json", f"{server.nbd}/tok-v2").stdout
    extents = json.loads(out)
    zero = [e for e in extents if e["type"] & 2]
    assert {"offset": 20 * 1024 * 1024, "length": 1024 * 1024} in [
        {"offset": e["offset"], "length": e["length"]} for e in zero
    ]
    assert sum(e["length"] for e in extents) == IMAGE_SIZE


def test_qemu_io_patterns_read_back_on_second_connection(server: ServerThread) -> None:
    uri = f"{server.nbd}/tok-a"
    qemu_io(
        uri,
        "write -P 0xab 0 64k",
        "write -P 0xcd 70000 1000",  # unaligned: read-modify-write in the cache
        "write -P 0xee -f 1M 128k",  # FUA
        "discard 2M 256k",
        "write -z 3M 1M",
        "write -z 4096 512",  # partial block zero
        "flush",
        "read -P 0xab 8192 4096",
    )
    # A second connection of the same session (qemu-io above has disconnected).
    qemu_io(
        uri,
        "read -P 0xab 0 4096",
        "read -P 0 4096 512",
        "read -P 0xab 4608 3584",
        "read -P 0xcd 70000 1000",
        "read -P 0xee 1M 128k",
        "read -P 0 2M 256k",
        "read -P 0 3M 1M",
        read_only=True,
    )


def test_a_zeroed_range_read_right_after_data_of_the_same_size_is_zeros(
    server: ServerThread,
) -> None:
    # One connection, one request at a time: each copied read may reuse the reply buffer
    # of the one before, which held data where these zero pieces are not read into.
    uri = f"{server.nbd}/tok-a"
    qemu_io(uri, "write -P 0x3c 5M 128k", "write -z 5373952 128k")
    qemu_io(
        uri,
        "read -P 0x3c 5M 128k",
        "read -P 0 5373952 128k",
        "read -P 0x3c 5M 128k",
        "read -P 0 5373952 128k",
        read_only=True,
    )


def test_other_session_sees_none_of_the_writes(server: ServerThread, images) -> None:  # type: ignore[no-untyped-def]
    qemu_io(f"{server.nbd}/tok-b", "write -P 0x11 0 1M", "flush")
    qemu_io(f"{server.nbd}/tok-b", "read -P 0x11 0 1M", read_only=True)
    base = images["base"].read_bytes()
    # Session A never wrote at 16M; session A's and B's writes are invisible to each other.
    fresh = run("nbdinfo", "--size", f"{server.nbd}/tok-ro").stdout.strip()
    assert int(fresh) == IMAGE_SIZE
    for tok in ("tok-a", "tok-ro", "tok-v2"):
        out = subprocess.run(
            ["nbdcopy", f"{server.nbd}/{tok}", "-"], capture_output=True, timeout=TIMEOUT
        ).stdout
        assert out[:1024] != b"\x11" * 1024
        assert out[16 << 20 : 17 << 20] == base[16 << 20 : 17 << 20]


def test_read_only_export_refuses_writes(server: ServerThread) -> None:
    out = run("qemu-io", "-f", "raw", "-c", "write 0 4k", f"{server.nbd}/tok-ro", check=False)
    assert "write failed" in (out.stdout + out.stderr) or out.returncode != 0


def test_unknown_token_refused(server: ServerThread) -> None:
    assert run("qemu-img", "info", f"{server.nbd}/no-such-token", check=False).returncode != 0
    assert run("nbdinfo", f"{server.nbd}/no-such-token", check=False).returncode != 0
    out = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{server.http}/s/nope")
    assert out.stdout == "404"


def test_http_head_and_ranges(server: ServerThread, images) -> None:  # type: ignore[no-untyped-def]
    base = images["base"].read_bytes()
    head = run("curl", "-sS", "-I", f"{server.http}/s/tok-ro").stdout.lower()
    assert "http/1.1 200" in head
    assert f"content-length: {IMAGE_SIZE}" in head
    assert "accept-ranges: bytes" in head
    # iPXE style: 512-byte blocks by Range, on one kept-alive connection.
    url = f"{server.http}/s/tok-ro"
    out = subprocess.run(
        ["curl", "-sS", "-v", "-r", "512-1023", url, "--next", "-r", "1048576-1049087", url],
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0
    assert out.stdout == base[512:1024] + base[1048576:1049088]
    err = out.stderr.decode()
    assert err.count("HTTP/1.1 206") == 2
    assert f"Content-Range: bytes 512-1023/{IMAGE_SIZE}" in err
    assert "Re-using existing connection" in err or "Reusing existing" in err
    # Suffix range, open-ended range, unsatisfiable range.
    tail = subprocess.run(["curl", "-sS", "-r", "-100", url], capture_output=True, timeout=30)
    assert tail.stdout == base[-100:]
    code = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-r", f"{IMAGE_SIZE}-", url)
    assert code.stdout == "416"


def test_http_reads_see_session_writes(server: ServerThread) -> None:
    qemu_io(f"{server.nbd}/tok-a", "write -P 0x77 8M 4096")
    out = subprocess.run(
        ["curl", "-sS", "-r", f"{8 << 20}-{(8 << 20) + 4095}", f"{server.http}/s/tok-a"],
        capture_output=True,
        timeout=30,
    )
    assert out.stdout == b"\x77" * 4096


def test_events_attached_detached_and_blocks(server: ServerThread) -> None:
    qemu_io(f"{server.nbd}/tok-a", "read 0 64k", "write -P 1 1M 4k", "read 2M 8k")
    server.wait_idle()
    attached = server.events(SessionAttached)
    detached = server.events(SessionDetached)
    assert any(e.session_id == "session-tok-a" and e.protocol == "nbd" for e in attached)
    assert any(e.protocol == "http" for e in attached)
    assert all(e.stream_node == "test-node" for e in attached)
    mine = [e for e in detached if e.session_id == "session-tok-a" and e.protocol == "nbd"]
    assert mine and mine[-1].bytes_written == 4096 and mine[-1].bytes_read >= 64 * 1024 + 8192
    assert mine[-1].client_addr.startswith("127.0.0.1:")
    extents = [x for e in server.events(BlocksRequested) if e.session_id == "session-tok-a"
               for x in e.extents]  # fmt: skip
    ops = {(off, length, op) for _, off, length, op in extents}
    assert (1 << 20, 4096, "w") in ops
    assert (2 << 20, 8192, "r") in ops
    assert all(t >= 0 for t, *_ in extents)


def metrics_here() -> dict[str, Any]:
    """This process's metrics as Prometheus reads them (the server runs in this process)."""
    text = generate_latest(REGISTRY).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def metric(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_the_data_plane_counts_bytes_and_times_requests(server: ServerThread) -> None:
    before = metrics_here()
    qemu_io(f"{server.nbd}/tok-a", "read 0 64k", "write -P 1 1M 4k", "flush")
    out = subprocess.run(
        ["curl", "-sS", "-r", "0-4095", f"{server.http}/s/tok-a"], capture_output=True, timeout=30
    )
    assert len(out.stdout) == 4096, out.stderr
    server.wait_idle()
    after = metrics_here()

    def grew(family: str, sample: str, **labels: str) -> float:
        return metric(after, family, sample, **labels) - metric(before, family, sample, **labels)

    streamed = ("streamboot_bytes_streamed", "streamboot_bytes_streamed_total")
    assert grew(*streamed, protocol="nbd", direction="read") >= 64 * 1024
    assert grew(*streamed, protocol="nbd", direction="write") == 4096
    assert grew(*streamed, protocol="http", direction="read") == 4096

    timed = ("streamboot_request_seconds", "streamboot_request_seconds_count")
    assert grew(*timed, service="stream", op="nbd:read") >= 1
    assert grew(*timed, service="stream", op="nbd:write") == 1
    assert grew(*timed, service="stream", op="nbd:flush") >= 1
    spent = grew("streamboot_request_seconds", "streamboot_request_seconds_sum",
                 service="stream", op="nbd:write")  # fmt: skip
    assert 0 < spent < 30
