"""The iSCSI target judged by real initiators: libiscsi's tools and QEMU's iSCSI driver.

Every read is compared with the image bytes; writes land in the session's write cache
(read back on a new connection of the same session, invisible to another session); the
image file itself must be unchanged at the end (fixture). Bad input is crafted on raw
sockets (tests/stream/iscsiraw.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from pathlib import Path

import pytest

from services.stream.iscsi.scsi import vdisk_id
from services.stream.iscsi.server import TARGET_PREFIX
from shared.events import SessionAttached, SessionDetached
from tests.stream.conftest import IMAGE_SIZE, ServerThread, sha256
from tests.stream.iscsiraw import RawIscsi
from tests.stream.test_clients import qemu_io, run

pytestmark = pytest.mark.skipif(
    not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed (make test-deps)"
)


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "uvloop"])
def server(make_server, request) -> ServerThread:  # type: ignore[no-untyped-def]
    # Our own transport (large reads by sendfile) and uvloop's (every read copied).
    return make_server(session_linger_s=60.0, handshake_timeout_s=1.0, nbd_zero_copy=request.param)


def url(server: ServerThread, token: str, lun: int = 0) -> str:
    return f"iscsi://127.0.0.1:{server.servers.iscsi_port}/{TARGET_PREFIX}{token}/{lun}"


def test_inquiry_names_the_device(server: ServerThread) -> None:
    out = run("iscsi-inq", url(server, "tok-ro")).stdout
    assert "Vendor:STRMBOOT" in out
    assert "Peripheral Device Type:DIRECT_ACCESS" in out


def test_device_identification_is_stable_per_vdisk(server: ServerThread) -> None:
    pages = [run("iscsi-inq", "-e", "1", "-c", "131", url(server, t)).stdout  # VPD 0x83
             for t in ("tok-a", "tok-ro")]  # fmt: skip
    assert "Designator Type:(3) NAA" in pages[0], pages[0]
    assert "Designator:[STRMBOOTgolden]" in pages[0], pages[0]
    # Two sessions of one vdisk: the same disk to the initiator; another vdisk: another id.
    assert pages[0] == pages[1]
    assert vdisk_id("golden") != vdisk_id("other")
    assert vdisk_id("golden")[0] >> 4 == 3  # NAA locally assigned


def test_capacity_is_the_image_size(server: ServerThread) -> None:
    out = run("iscsi-readcapacity16", url(server, "tok-ro")).stdout
    assert f"Total size:{IMAGE_SIZE}" in out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out


def test_qemu_img_convert_whole_export(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(server, "tok-ro"), str(out))
    assert sha256(out) == sha256(images["base"])
    info = json.loads(run("qemu-img", "info", "--output=json", url(server, "tok-ro")).stdout)
    assert info["virtual-size"] == IMAGE_SIZE


def test_header_digests(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "copy.raw"
    opts = (
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.lun=0,file.header-digest=crc32c,"
        f"file.portal=127.0.0.1:{server.servers.iscsi_port},file.target={TARGET_PREFIX}tok-ro"
    )
    run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(out))
    assert sha256(out) == sha256(images["base"])


def test_version_chain_served(server: ServerThread, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "v2.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(server, "tok-v2"), str(out))
    assert sha256(out) == sha256(images["v2_full"])


def test_writes_land_in_the_session_only(server: ServerThread, images) -> None:  # type: ignore[no-untyped-def]
    # Large (R2T bursts), small and unaligned-to-burst writes, then a flush.
    qemu_io(
        url(server, "tok-a"),
        "write -P 0xab 1M 3M",
        "write -P 0xcd 100k 4k",
        "flush",
        "read -P 0xab 1M 3M",
        "read -P 0xcd 100k 4k",
    )
    # A new connection of the same session reads them back...
    qemu_io(url(server, "tok-a"), "read -P 0xab 1M 3M", "read -P 0xcd 100k 4k")
    # ...another session of the same vdisk reads the image.
    out = run("qemu-io", "-f", "raw", "-c", "read -v 100k 16", url(server, "tok-b")).stdout
    base = images["base"].read_bytes()[100 * 1024 : 100 * 1024 + 16]
    assert base.hex()[:8] in out.replace(" ", "")


def test_read_only_export_refuses_writes(server: ServerThread, tmp_path: Path) -> None:
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", url(server, "tok-ro"),
              check=False)  # fmt: skip
    assert "write failed" in out.stdout + out.stderr or out.returncode != 0
    # The sense: DATA PROTECT / WRITE PROTECTED, and the MODE SENSE WP bit says so first.
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro")
    status, sense = c.write10(0, b"\x11" * 512)
    assert status == 2 and sense[2] == 0x07 and sense[12] == 0x27, sense.hex()
    c.close()


def test_lba_out_of_range_and_bad_opcode(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro")
    status, sense = c.read10(IMAGE_SIZE // 512, 1)
    assert status == 2 and (sense[2], sense[12]) == (0x05, 0x21), sense.hex()
    status, sense = c.command(bytes([0xC7]) + bytes(15), 0)  # a vendor opcode
    assert status == 2 and (sense[2], sense[12]) == (0x05, 0x20), sense.hex()
    status, sense = c.command(bytes([0x12, 0x01, 0x42, 0, 255]) + bytes(11), 255)  # VPD 0x42
    assert status == 2 and (sense[2], sense[12]) == (0x05, 0x24), sense.hex()
    c.close()


def test_a_read_that_sends_data_writes_nothing(server: ServerThread, images) -> None:  # type: ignore[no-untyped-def]
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-a")
    read10 = bytes([0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0]) + bytes(6)  # one block at LBA 5
    # With the Write flag and data: GOOD (as tgt answers, and libiscsi's suite expects)...
    assert c.command(read10, 512, b"\x77" * 512) == (0, b"")
    # ...and the data went nowhere.
    assert c.read10(5, 1) == (0, images["base"].read_bytes()[5 * 512 : 6 * 512])
    c.close()


def test_unknown_target_is_refused_and_server_unaffected(server: ServerThread) -> None:
    out = run("iscsi-inq", url(server, "no-such-token"), check=False)
    assert out.returncode != 0
    c = RawIscsi(server.servers.iscsi_port)
    assert c.login(TARGET_PREFIX + "no-such-token", expect_ok=False) == 0x0203  # not found
    run("iscsi-inq", url(server, "tok-ro"))


def test_discovery_does_not_list_tokens(server: ServerThread) -> None:
    out = run("iscsi-ls", f"iscsi://127.0.0.1:{server.servers.iscsi_port}", check=False)
    assert "tok-" not in out.stdout


def test_attach_and_detach_events(server: ServerThread) -> None:
    run("iscsi-inq", url(server, "tok-v2"))
    server.wait_idle()
    attached = [e for e in server.events(SessionAttached) if e.protocol == "iscsi"]
    detached = [e for e in server.events(SessionDetached) if e.protocol == "iscsi"]
    assert any(e.session_id == "session-tok-v2" for e in attached)
    assert any(e.session_id == "session-tok-v2" for e in detached)


def test_closing_the_session_ends_its_connections(server: ServerThread) -> None:
    logged_in, logging_in = RawIscsi(server.servers.iscsi_port), RawIscsi(server.servers.iscsi_port)
    logged_in.login(TARGET_PREFIX + "tok-v2")
    assert logged_in.read10(0, 1)[0] == 0
    server.call(lambda: server.servers.close_session("session-tok-v2"))  # the registry closed it
    assert logged_in.closed_by_peer()
    # A login half done (security stage passed, the session opened) when its session is
    # closed ends there: it never reaches full feature phase on the dropped session.
    first = {"InitiatorName": "iqn.2026-12.test:raw", "TargetName": TARGET_PREFIX + "tok-v2",
             "AuthMethod": "None"}  # fmt: skip
    assert logging_in.login_step(0, 1, first) == 0
    server.call(lambda: server.servers.close_session("session-tok-v2"))
    with pytest.raises(ConnectionError):
        logging_in.login_step(1, 3, {"MaxRecvDataSegmentLength": "262144"})
    run("iscsi-inq", url(server, "tok-v2"))  # the next login opens it again


def test_a_vanished_initiator_detaches(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-b")
    assert c.read10(0, 1)[0] == 0
    # The initiator dies without a logout: its socket is reset.
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()

    server.wait_idle()  # the reset has reached the server
    assert any(
        e.session_id == "session-tok-b" and e.protocol == "iscsi" and e.bytes_read == 512
        for e in server.events(SessionDetached)
    )


def test_a_login_with_the_same_name_and_isid_reinstates_the_session(server: ServerThread) -> None:
    """RFC 7143 session reinstatement: the initiator lost its connection (a reboot, a blip)
    and logs in again with the same InitiatorName and ISID; the old connection, which it
    will never use again, ends at once instead of when keepalive finds it dead. Another
    ISID is another I_T nexus: both stay."""
    port, target = server.servers.iscsi_port, TARGET_PREFIX + "tok-b"
    lost, again, other = RawIscsi(port), RawIscsi(port), RawIscsi(port)
    other.isid = bytes.fromhex("400001370000")  # Windows' form
    lost.login(target)
    lba = IMAGE_SIZE // 512 - 1
    status, before = lost.read10(lba, 1)
    assert status == 0
    assert lost.write10(lba, b"\x5a" * 512)[0] == 0
    other.login(target)
    again.login(target)
    assert lost.closed_by_peer()
    assert again.read10(lba, 1) == (0, b"\x5a" * 512)  # the same session, its writes
    assert other.read10(lba, 1) == (0, b"\x5a" * 512)  # not ended by a login of another ISID
    assert again.write10(lba, before)[0] == 0
    again.close()
    other.close()
    server.wait_idle()
    assert any(
        e.session_id == "session-tok-b" and e.reason == "session-reinstated"
        for e in server.events(SessionDetached)
    )


# --- bad input ----------------------------------------------------------------------------


def test_oversized_data_segment_ends_the_connection(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro")
    bhs = bytearray(48)
    bhs[0] = 0x01
    bhs[1] = 0x80
    bhs[5:8] = (16 * 1024 * 1024 - 1).to_bytes(3, "big")  # 16 MiB announced
    c.sock.sendall(bhs)
    assert c.closed_by_peer()
    run("iscsi-inq", url(server, "tok-ro"))


def test_wrong_header_digest_ends_the_connection(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro", header_digest=True)
    assert c.read10(0, 1)[0] == 0  # right digests: served
    c.send_pdu(c.scsi_bhs(bytes([0x28]) + bytes(6) + b"\x00\x01" + bytes(7), 512, read=True),
               corrupt_header_digest=True)  # fmt: skip
    assert c.closed_by_peer()
    run("iscsi-inq", url(server, "tok-ro"))


def test_garbage_before_login_and_a_login_that_never_ends(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.sock.sendall(os.urandom(48))
    assert c.closed_by_peer()
    # A login that starts and never finishes is ended by the handshake timeout.
    c = RawIscsi(server.servers.iscsi_port)
    c.sock.sendall(bytes([0x43]) + bytes(20))
    assert c.closed_by_peer(timeout=10)
    run("iscsi-inq", url(server, "tok-ro"))


def test_commands_outside_the_window_are_dropped(server: ServerThread) -> None:
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro")
    c.cmd_sn += 1000  # far ahead of ExpCmdSN: dropped, no answer
    c.send_pdu(c.scsi_bhs(bytes(16), 0))
    c.cmd_sn -= 1001
    assert c.command(bytes(16), 0)[0] == 0  # the next in-window command is answered
    c.close()


def test_a_lun_that_does_not_exist(server: ServerThread) -> None:
    # libiscsi's tools fail at their first command with the standard sense...
    out = run("iscsi-readcapacity16", url(server, "tok-ro", lun=3), check=False)
    assert out.returncode != 0 and "LOGICAL_UNIT_NOT_SUPPORTED" in out.stdout + out.stderr
    c = RawIscsi(server.servers.iscsi_port)
    c.login(TARGET_PREFIX + "tok-ro")
    # ...which every command but INQUIRY and REPORT LUNS gets: CHECK CONDITION, ILLEGAL
    # REQUEST, LOGICAL UNIT NOT SUPPORTED (0x25/0x00).
    for cdb, edtl in ((bytes(6), 0), (struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), 512)):
        status, sense = c.command(cdb, edtl, lun=3)
        assert status == 2 and (sense[2] & 0xF, sense[12], sense[13]) == (5, 0x25, 0), sense
    # INQUIRY there answers: peripheral qualifier 3 (no unit can be here), type 0x1F.
    status, data = c.command(bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=3)
    assert status == 0 and data[0] == 0x7F, data[:8].hex()
    # REPORT LUNS lists LUN 0 only.
    status, data = c.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 256, lun=3)
    assert status == 0 and data[:4] == (8).to_bytes(4, "big") and data[8:16] == bytes(8)
    assert c.read10(0, 1)[0] == 0  # LUN 0 is served on the same connection
    c.close()


def test_a_target_name_that_names_no_session(server: ServerThread) -> None:
    # Not a streamboot name, a token nobody issued, an empty one: 0x0203 (not found);
    # no target name at all: 0x0207 (missing parameter).
    for name in ("iqn.2004-05.org.other:disk1", TARGET_PREFIX + "nobody", TARGET_PREFIX):
        c = RawIscsi(server.servers.iscsi_port)
        assert c.login(name, expect_ok=False) == 0x0203, name
        c.close()
    c = RawIscsi(server.servers.iscsi_port)
    keys = {"InitiatorName": "iqn.2026-12.test:raw", "SessionType": "Normal"}
    assert c.login_step(1, 3, keys) == 0x0207
    c.close()
