"""CHAP (one-way and mutual) and the device's initiator name on the iSCSI target, judged by
libiscsi's tools (credentials in the URL) and raw logins for what no tool sends.

A refused login gets its status (0x0201 authentication, 0x0202 authorization) and an
IscsiLoginRefused event naming the reason; the server serves the next initiator.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from services.stream.announce import chap_from_record
from services.stream.iscsi.server import TARGET_PREFIX
from services.stream.settings import StreamSettings
from services.stream.spec import ChapSecrets
from shared.events import IscsiLoginRefused, SessionAttached
from tests.stream.conftest import ServerThread, spec
from tests.stream.iscsiraw import RawIscsi
from tests.stream.test_clients import run

pytestmark = pytest.mark.skipif(
    not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed (make test-deps)"
)

USER, SECRET = "pc-0042", "s3cret-0042-ab"
TARGET_USER, TARGET_SECRET = "streamboot", "target-secret-99"
DEVICE_IQN = "iqn.2026-12.io.streamboot.client:525400000042"


@pytest.fixture(scope="module")
def server(images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:  # type: ignore[no-untyped-def]
    exports = {
        "tok-chap": spec("tok-chap", images, chap=ChapSecrets(USER, SECRET)),
        "tok-mutual": spec(
            "tok-mutual", images, chap=ChapSecrets(USER, SECRET, TARGET_USER, TARGET_SECRET)
        ),
        "tok-iqn": spec("tok-iqn", images, initiator_iqn=DEVICE_IQN),
        "tok-open": spec("tok-open", images),
    }
    st = StreamSettings(nbd_port=0, http_port=0, node_id="test-node",
                        write_cache_dir=tmp_path_factory.mktemp("wc"), handshake_timeout_s=2.0)  # fmt: skip
    s = ServerThread(exports, st)
    s.start()
    yield s
    s.stop()


def url(server: ServerThread, token: str, creds: str = "", query: str = "") -> str:
    at = f"{creds}@" if creds else ""
    return f"iscsi://{at}127.0.0.1:{server.servers.iscsi_port}/{TARGET_PREFIX}{token}/0{query}"


def refusals(server: ServerThread, token: str) -> list[IscsiLoginRefused]:
    return [
        e
        for e in server.events(IscsiLoginRefused)
        if isinstance(e, IscsiLoginRefused) and e.session_id == f"session-{token}"
    ]


def test_one_way_chap_logs_in_with_the_secret(server: ServerThread) -> None:
    out = run("iscsi-inq", url(server, "tok-chap", f"{USER}%{SECRET}")).stdout
    assert "Vendor:STRMBOOT" in out
    assert any(e.session_id == "session-tok-chap" for e in server.events(SessionAttached))


def test_wrong_secret_is_refused_with_an_event(server: ServerThread) -> None:
    before = len(refusals(server, "tok-chap"))
    out = run("iscsi-inq", url(server, "tok-chap", f"{USER}%wrong-secret-1"), check=False)
    assert out.returncode != 0
    out = run("iscsi-inq", url(server, "tok-chap", f"someone-else%{SECRET}"), check=False)
    assert out.returncode != 0
    got = refusals(server, "tok-chap")[before:]
    assert [e.status for e in got] == [0x0201, 0x0201], got
    assert all("CHAP name or response wrong" in e.reason for e in got), got
    assert all(SECRET not in e.reason and "wrong-secret" not in e.reason for e in got)
    run("iscsi-inq", url(server, "tok-chap", f"{USER}%{SECRET}"))  # the server serves on


def test_no_credentials_on_a_chap_session_is_refused(server: ServerThread) -> None:
    before = len(refusals(server, "tok-chap"))
    # libiscsi without credentials starts in the operational stage, skipping security.
    assert run("iscsi-inq", url(server, "tok-chap"), check=False).returncode != 0
    # So does this raw login.
    c = RawIscsi(server.servers.iscsi_port)
    assert c.login(TARGET_PREFIX + "tok-chap", expect_ok=False) == 0x0201
    c.close()
    reasons = [e.reason for e in refusals(server, "tok-chap")[before:]]
    assert reasons == ["CHAP required: the login skipped it"] * 2, reasons
    # Offering only AuthMethod=None in the security stage is refused as well.
    c = RawIscsi(server.servers.iscsi_port)
    keys = {"InitiatorName": "iqn.2026-12.test:raw", "TargetName": TARGET_PREFIX + "tok-chap",
            "AuthMethod": "None"}  # fmt: skip
    assert c.login_step(0, 1, keys) == 0x0201
    c.close()
    assert "no common AuthMethod" in refusals(server, "tok-chap")[-1].reason


def test_chap_offered_to_a_session_without_it_is_refused(server: ServerThread) -> None:
    # No CHAP set: an initiator that insists on CHAP gets 0x0201, as before CHAP existed.
    out = run("iscsi-inq", url(server, "tok-open", f"{USER}%{SECRET}"), check=False)
    assert out.returncode == 0 or "CHAP" in out.stderr  # libiscsi offers CHAP,None
    c = RawIscsi(server.servers.iscsi_port)
    keys = {"InitiatorName": "iqn.2026-12.test:raw", "TargetName": TARGET_PREFIX + "tok-open",
            "AuthMethod": "CHAP"}  # fmt: skip
    assert c.login_step(0, 1, keys) == 0x0201
    c.close()


def test_mutual_chap(server: ServerThread) -> None:
    target = f"?target_user={TARGET_USER}&target_password={TARGET_SECRET}"
    out = run("iscsi-inq", url(server, "tok-mutual", f"{USER}%{SECRET}", target)).stdout
    assert "Vendor:STRMBOOT" in out
    # The initiator checks the target: a target secret it does not expect fails its login.
    wrong = f"?target_user={TARGET_USER}&target_password=not-the-target-1"
    out = run("iscsi-inq", url(server, "tok-mutual", f"{USER}%{SECRET}", wrong), check=False)
    assert out.returncode != 0
    # An initiator that does not challenge the target is refused: mutual is required.
    before = len(refusals(server, "tok-mutual"))
    out = run("iscsi-inq", url(server, "tok-mutual", f"{USER}%{SECRET}"), check=False)
    assert out.returncode != 0
    got = refusals(server, "tok-mutual")[before:]
    assert len(got) == 1 and "mutual CHAP is required" in got[0].reason, got


def _chap_start(c: RawIscsi, token: str) -> tuple[int, bytes]:
    keys = {"InitiatorName": "iqn.2026-12.test:raw", "TargetName": TARGET_PREFIX + token,
            "AuthMethod": "CHAP"}  # fmt: skip
    assert c.login_step(0, 0, keys, transit=False) == 0
    assert c.login_keys["AuthMethod"] == "CHAP"
    assert c.login_step(0, 0, {"CHAP_A": "7,5"}, transit=False) == 0
    assert c.login_keys["CHAP_A"] == "5"
    return int(c.login_keys["CHAP_I"]), bytes.fromhex(c.login_keys["CHAP_C"][2:])


def test_raw_chap_exchange_and_hostile_values(server: ServerThread) -> None:
    # RFC 1994 by hand: the response MD5(id + secret + challenge) passes...
    c = RawIscsi(server.servers.iscsi_port)
    ident, challenge = _chap_start(c, "tok-chap")
    answer = hashlib.md5(bytes([ident]) + SECRET.encode() + challenge).hexdigest()
    assert c.login_step(0, 1, {"CHAP_N": USER, "CHAP_R": "0x" + answer}) == 0
    assert c.login_transit
    c.close()
    # ...a mutual challenge equal to ours (a reflection) and garbage responses do not.
    for bad in (
        {"CHAP_N": USER, "CHAP_R": "0xzz"},
        {"CHAP_N": USER, "CHAP_R": "0x" + "00" * 2000},
        {"CHAP_N": USER},
    ):
        c = RawIscsi(server.servers.iscsi_port)
        _chap_start(c, "tok-chap")
        assert c.login_step(0, 1, bad) == 0x0201, bad
        c.close()
    c = RawIscsi(server.servers.iscsi_port)
    ident, challenge = _chap_start(c, "tok-mutual")
    answer = hashlib.md5(bytes([ident]) + SECRET.encode() + challenge).hexdigest()
    reflect = {"CHAP_N": USER, "CHAP_R": "0x" + answer, "CHAP_I": str(ident),
               "CHAP_C": "0x" + challenge.hex()}  # fmt: skip
    assert c.login_step(0, 1, reflect) == 0x0201
    c.close()
    run("iscsi-inq", url(server, "tok-chap", f"{USER}%{SECRET}"))


def test_only_the_devices_initiator_name_logs_in(server: ServerThread) -> None:
    out = run("iscsi-inq", "-i", DEVICE_IQN, url(server, "tok-iqn")).stdout
    assert "Vendor:STRMBOOT" in out
    out = run("iscsi-inq", "-i", "iqn.2026-12.test:intruder", url(server, "tok-iqn"), check=False)
    assert out.returncode != 0
    c = RawIscsi(server.servers.iscsi_port)
    assert c.login(TARGET_PREFIX + "tok-iqn", expect_ok=False) == 0x0202  # authorization
    c.close()
    got = refusals(server, "tok-iqn")
    assert [e.status for e in got] == [0x0202, 0x0202], got
    assert "iqn.2026-12.test:intruder" in got[0].reason and got[0].initiator.endswith("intruder")


@pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="libiscsi-bin is not installed")
def test_conformance_suites_log_in_with_mutual_chap(server: ServerThread, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A few of libiscsi's suites (each test logs in anew) with mutual CHAP in the URL: every
    login passes CHAP, and the commands behave as without it (the whole suite runs
    without CHAP in test_iscsi_conformance.py)."""
    target = f"?target_user={TARGET_USER}&target_password={TARGET_SECRET}"
    for suite in ("SCSI.TestUnitReady", "SCSI.Read10", "SCSI.Write10", "iSCSI.iSCSITMF"):
        out = subprocess.run(
            ["iscsi-test-cu", "-d", "-n", "-t", suite,
             url(server, "tok-mutual", f"{USER}%{SECRET}", target)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        summary = out.stdout[out.stdout.rfind("Run Summary") :]
        assert "Run Summary" in out.stdout, out.stdout[-2000:]
        tests = next(x.split() for x in summary.splitlines() if x.strip().startswith("tests"))
        assert int(tests[2]) > 0 and tests[4] == "0", summary  # Total Ran Passed Failed


@pytest.mark.parametrize(
    "chap",
    [
        "secret",
        {"user": "u"},
        {"user": "u", "secret": ""},
        {"user": "u", "secret": 5},
        {"user": "u", "secret": "s", "reverse_user": "t"},
    ],
)
def test_a_malformed_chap_record_is_refused(chap: object) -> None:
    """The registry's answer is input too: a CHAP record that is not one refuses the
    session (RegistryResolver logs it) rather than serving it without CHAP."""
    with pytest.raises(ValueError):
        chap_from_record(chap)
    assert chap_from_record(None) is None
    assert chap_from_record({"user": "u", "secret": "s"}) == ChapSecrets("u", "s")
    assert "sekrit" not in repr(ChapSecrets("u", "sekrit-secret", "t", "sekrit-target"))


def test_discovery_with_chap_credentials(server: ServerThread) -> None:
    """iscsi-ls with CHAP in the URL: discovery sessions have no session and no CHAP of
    their own, so the login passes with AuthMethod=None and lists no target (tokens are
    secrets, as without CHAP)."""
    portal = f"iscsi://{USER}%{SECRET}@127.0.0.1:{server.servers.iscsi_port}"
    out = run("iscsi-ls", portal, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tok-" not in out.stdout
