"""The client's shell core (clients/linux/.../client.sh) run by the shells an initramfs has:
busybox sh (initramfs-tools, dracut with busybox) and dash/bash.

The pure parts (command line, the redeem answer, blkid lines -> root and write-cache
device) are called directly; the redeem request goes to a real HTTP server (the answers are
the contract's) through the same curl or busybox nc the initramfs uses.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamboot.client_package import PACKAGE_TREE

CORE = PACKAGE_TREE / "usr/lib/streamboot/client.sh"
SHELLS = [
    pytest.param(["busybox", "sh"], id="busybox", marks=pytest.mark.skipif(
        shutil.which("busybox") is None, reason="needs busybox")),
    pytest.param(["dash"], id="dash", marks=pytest.mark.skipif(
        shutil.which("dash") is None, reason="needs dash")),
    pytest.param(["bash", "--posix"], id="bash"),
]  # fmt: skip
UUID = "43d4cb0a-ca02-42b3-a948-fa0b12a41fc7"
NONCE = "n0nce_ABCDEFGHIJ-0123"
GOOD_CMDLINE = (
    "BOOT_IMAGE=vmlinuz boot=streamboot root=streamboot ip=dhcp rd.neednet=1 "
    f"streamboot.server=http://10.77.0.1:8080 streamboot.nonce={NONCE} "
    f"streamboot.root=UUID={UUID} streamboot.wc=client-ram systemd.hostname=pc-001 "
    "systemd.machine_id=0123456789abcdef0123456789abcdef console=ttyS0 *"
)
ANSWER = (
    "nbd_host=10.77.0.1\nnbd_port=10809\nexport=tok-123_abc\nwrite_cache=client-disk\n"
    "persistence=keep\nhostname=pc-002\nmachine_id=fedcba9876543210fedcba9876543210\n"
    "session_id=7\ntraceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n"
)
BLKID = (
    '/dev/nbd0: PTUUID="e4477add" PTTYPE="dos" DEVNAME="/dev/nbd0"\n'
    '/dev/nbd0p1: LABEL="EFI" UUID="ABCD-1234" TYPE="vfat" PARTUUID="e4477add-01" '
    'DEVNAME="/dev/nbd0p1"\n'
    f'/dev/nbd0p2: LABEL="streamroot" UUID="{UUID}" BLOCK_SIZE="4096" TYPE="ext4" '
    'PARTUUID="e4477add-02" DEVNAME="/dev/nbd0p2"\n'
)


def sh(
    shell: list[str], script: str, tmp: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after sourcing the core; SB_RUN in ``tmp``, messages to stderr."""
    prelude = f"SB_RUN={tmp}/run SB_CONSOLE=/nonexistent/console\n. {CORE}\n"
    return subprocess.run(
        [*shell, "-c", prelude + script], input=stdin, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def values(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


DUMP = 'rc=$?; for v in SB_SERVER SB_NONCE SB_ROOT SB_WC SB_HOSTNAME SB_MACHINE_ID SB_NBD_HOST SB_NBD_PORT SB_EXPORT SB_PERSISTENCE SB_SESSION_ID SB_ERROR; do eval "echo $v=\\$$v"; done; echo rc=$rc'


@pytest.mark.parametrize("shell", SHELLS)
def test_the_command_line_gives_server_nonce_root_and_identity(
    shell: list[str], tmp_path: Path
) -> None:
    # The trailing `*` on the command line must not glob the current directory.
    (tmp_path / "decoy").write_text("")
    done = sh(shell, f"cd {tmp_path}; sb_parse_cmdline '{GOOD_CMDLINE}'; {DUMP}", tmp_path)
    got = values(done)
    assert got["rc"] == "0", done
    assert got["SB_SERVER"] == "http://10.77.0.1:8080"
    assert got["SB_NONCE"] == NONCE
    assert got["SB_ROOT"] == f"UUID={UUID}"
    assert got["SB_WC"] == "client-ram"
    assert got["SB_HOSTNAME"] == "pc-001"
    assert got["SB_MACHINE_ID"] == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("cmdline", "why"),
    [
        ("root=streamboot", "no streamboot.server="),
        ("streamboot.server=tftp://x", "must be an http:// URL"),
        ("streamboot.server=http://x;reboot", "characters outside"),
        ("streamboot.server=http://x:1", "no streamboot.nonce="),
        ("streamboot.server=http://x:1 streamboot.nonce=short", "16 to 64"),
        ("streamboot.server=http://x:1 streamboot.nonce=" + "a" * 65, "16 to 64"),
        ("streamboot.server=http://x:1 streamboot.nonce=abcdefgh.ijklmnop", "malformed"),
        (f"streamboot.server=http://x:1 streamboot.nonce={NONCE} streamboot.root=/dev/sda1",
         "UUID=..., PARTUUID=... or whole"),
        (f"streamboot.server=http://x:1 streamboot.nonce={NONCE} streamboot.wc=client-usb",
         "not a write-cache type"),
    ],
)  # fmt: skip
def test_a_bad_command_line_fails_with_one_clear_reason(
    shell: list[str], cmdline: str, why: str, tmp_path: Path
) -> None:
    got = values(sh(shell, f"sb_parse_cmdline '{cmdline}'; {DUMP}", tmp_path))
    assert got["rc"] == "1"
    assert why in got["SB_ERROR"]
    assert "\n" not in got["SB_ERROR"]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_redeem_answer_replaces_the_command_line(shell: list[str], tmp_path: Path) -> None:
    answer = tmp_path / "answer"
    # CRLF line ends, an unknown key (a newer server) and no newline at the end.
    answer.write_text(ANSWER.replace("\n", "\r\n") + "future_key=1\r\nlast=x")
    script = f"sb_parse_cmdline '{GOOD_CMDLINE}' && sb_parse_answer {answer}; {DUMP}"
    got = values(sh(shell, script, tmp_path))
    assert got["rc"] == "0", got
    assert got["SB_NBD_HOST"] == "10.77.0.1" and got["SB_NBD_PORT"] == "10809"
    assert got["SB_EXPORT"] == "tok-123_abc"
    assert got["SB_WC"] == "client-disk"  # the answer wins over streamboot.wc=
    assert got["SB_PERSISTENCE"] == "keep"
    assert got["SB_HOSTNAME"] == "pc-002"
    assert got["SB_MACHINE_ID"] == "fedcba9876543210fedcba9876543210"
    assert got["SB_SESSION_ID"] == "7"


@pytest.mark.parametrize("shell", SHELLS)
def test_the_failover_nodes_follow_the_sessions_node_each_once(
    shell: list[str], tmp_path: Path
) -> None:
    """nbd_nodes= (docs/failover.md): the session's node first, then the others in the
    answer's order; duplicates and words that are not host:port are left out."""
    answer = tmp_path / "answer"
    answer.write_text(
        ANSWER + "nbd_nodes=10.77.0.2:10809,10.77.0.1:10809,junk,10.77.0.3:10900,:1\n"
    )
    script = f"sb_parse_cmdline '{GOOD_CMDLINE}' && sb_parse_answer {answer} && sb_nbd_nodes"
    done = sh(shell, script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10.77.0.1:10809", "10.77.0.2:10809", "10.77.0.3:10900"]
    # Without the key (an older server): the session's node alone.
    answer.write_text(ANSWER)
    done = sh(shell, script, tmp_path)
    assert done.stdout.split() == ["10.77.0.1:10809"]


@pytest.mark.parametrize("shell", SHELLS)
def test_ipv6_stream_nodes_are_handed_to_the_helper_in_brackets(
    shell: list[str], tmp_path: Path
) -> None:
    """A session's node on an IPv6 address (nbd_host= has no brackets) and IPv6 nodes in
    nbd_nodes=: each "[address]:port", never globbed (brackets elsewhere: a bad answer)."""
    answer = tmp_path / "answer"
    v6 = ANSWER.replace("nbd_host=10.77.0.1", "nbd_host=fd00::1")
    assert v6 != ANSWER
    answer.write_text(v6 + "nbd_nodes=[fd00::2]:10809,10.77.0.3:10900\n")
    script = f"sb_parse_cmdline '{GOOD_CMDLINE}' && sb_parse_answer {answer} && sb_nbd_nodes"
    done = sh(shell, script, tmp_path)
    assert done.returncode == 0, done.stderr
    want = ["[fd00::1]:10809", "[fd00::2]:10809", "10.77.0.3:10900"]
    assert done.stdout.split() == want
    # As the helper gets them, in a folder with a file each would match as a pattern.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "streamboot-nbd").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\n')
    (bin_dir / "streamboot-nbd").chmod(0o755)
    (tmp_path / "1:10809").touch()
    (tmp_path / "2:10809").touch()
    connect = (
        f"cd {tmp_path}; PATH={bin_dir}:$PATH; sb_parse_cmdline '{GOOD_CMDLINE}' && "
        f"sb_parse_answer {answer} && _sb_ro= _sb_timeout= sb_nbd_connect"
    )
    done = sh(shell, connect, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().split()[-3:] == want


@pytest.mark.parametrize("shell", SHELLS)
def test_the_failover_helper_is_given_the_boot_server_to_refresh_from(
    shell: list[str], tmp_path: Path
) -> None:
    """The helper asks the boot server for the live nodes when all of its list fail
    (docs/failover.md): the core gives it the server of the command line. A stand-in
    helper on PATH records its arguments."""
    answer = tmp_path / "answer"
    answer.write_text(ANSWER + "nbd_nodes=10.77.0.2:10809\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "streamboot-nbd").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\n')
    (bin_dir / "streamboot-nbd").chmod(0o755)
    script = (
        f"PATH={bin_dir}:$PATH; sb_parse_cmdline '{GOOD_CMDLINE}' && "
        f"sb_parse_answer {answer} && _sb_ro= _sb_timeout= sb_nbd_connect"
    )
    done = sh(shell, script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().split() == [
        "-d", "/dev/nbd0", "-s", "http://10.77.0.1:8080", "-N", "tok-123_abc",
        "10.77.0.1:10809", "10.77.0.2:10809",
    ]  # fmt: skip


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("export=tok-123_abc\n", ""), "no export="),
        (("nbd_port=10809", "nbd_port=99999"), "malformed nbd_port="),
        (("nbd_port=10809", "nbd_port=1x"), "malformed nbd_port="),
        (("nbd_port=10809", "nbd_port=[10809]"), "malformed nbd_port="),
        (("session_id=7\n", "session_id=7\nnbd_nodes=[fd00::2]:1,$(reboot)\n"),
         "malformed nbd_nodes="),
        (("export=tok-123_abc", "export=tok 1"), "malformed export="),
        (("export=tok-123_abc", "export=$(reboot)"), "malformed export="),
        (("write_cache=client-disk", "write_cache=tape"), "unknown write_cache="),
        (("persistence=keep", "persistence=forever"), "unknown persistence="),
        (("hostname=pc-002", "hostname=pc/002"), "not a valid hostname"),
        (("machine_id=fedcba9876543210fedcba9876543210", "machine_id=FEDC"), "machine-id"),
        (("session_id=7\n", "session_id=7\njunk\n"), "not key=value"),
        (("session_id=7\n", "session_id=7\n" + "x=1\n" * 80), "too long"),
    ],
)  # fmt: skip
def test_a_bad_answer_fails_with_one_clear_reason(
    shell: list[str], change: tuple[str, str], why: str, tmp_path: Path
) -> None:
    answer = tmp_path / "answer"
    answer.write_text(ANSWER.replace(*change))
    got = values(sh(shell, f"sb_parse_answer {answer}; {DUMP}", tmp_path))
    assert got["rc"] == "1"
    assert why in got["SB_ERROR"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("spec", "found"),
    [
        (f"UUID={UUID}", "/dev/nbd0p2 ext4"),
        (f"UUID={UUID.upper()}", "/dev/nbd0p2 ext4"),
        ("UUID=abcd-1234", "/dev/nbd0p1 vfat"),
        ("PARTUUID=e4477add-02", "/dev/nbd0p2 ext4"),
        ("whole", "/dev/nbd0 "),
        ("UUID=e4477add-02", None),  # a PARTUUID is not a UUID
        ("UUID=00000000-0000-0000-0000-000000000000", None),
    ],
)
def test_the_root_is_picked_from_blkid_by_streamboot_root(
    shell: list[str], spec: str, found: str | None, tmp_path: Path
) -> None:
    done = sh(shell, f"sb_pick_root '{spec}' /dev/nbd0; echo rc=$?", tmp_path, BLKID)
    lines = done.stdout.splitlines()
    if found is None:
        assert lines == ["rc=1"]
    else:
        assert lines == [found, "rc=0"]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_local_write_cache_is_found_by_label_never_on_the_streamed_disk(
    shell: list[str], tmp_path: Path
) -> None:
    script = "mkdir -p $SB_RUN; sb_pick_wc; echo rc=$?"
    # The streamed image carrying the label does not count: writes must stay local.
    streamed = '/dev/nbd0p3: LABEL="streamboot-wc" TYPE="ext4"\n'
    local = '/dev/sda1: LABEL="data" TYPE="xfs"\n/dev/sdb2: LABEL="streamboot-wc" TYPE="ext4"\n'
    assert sh(shell, script, tmp_path, streamed + local).stdout.split("\n")[:2] == [
        "/dev/sdb2 ext4", "rc=0",
    ]  # fmt: skip
    blank_gpt = '/dev/vdb1: PARTLABEL="streamboot-wc" PARTUUID="aa-bb"\n'
    assert sh(shell, script, tmp_path, streamed + blank_gpt).stdout.splitlines() == [
        "/dev/vdb1 ", "rc=0",
    ]  # fmt: skip
    assert sh(shell, script, tmp_path, streamed).stdout.splitlines() == ["rc=1"]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_raw_http_response_splits_into_status_and_body(shell: list[str], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(
        b"HTTP/1.1 410 Gone\r\ncontent-type: text/plain\r\ncontent-length: 23\r\n\r\n"
        b"nonce already redeemed\n"
    )
    done = sh(shell, f"sb_http_split {raw} {tmp_path}/body", tmp_path)
    assert done.stdout.strip() == "410"
    assert (tmp_path / "body").read_text() == "nonce already redeemed\n"


class _Boot(http.server.BaseHTTPRequestHandler):
    """Answers /session/redeem as the contract says: once per nonce, then 410."""

    redeemed: set[str] = set()

    def do_GET(self) -> None:
        nonce = self.path.partition("nonce=")[2]
        if self.path.startswith("/session/redeem") and nonce not in self.redeemed:
            self.redeemed.add(nonce)
            status, body = 200, ANSWER
        elif nonce in self.redeemed:
            status, body = 410, "nonce already redeemed\n"
        else:
            status, body = 404, "nonce unknown\n"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def boot_http() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Boot)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "client",
    [
        pytest.param("curl", marks=pytest.mark.skipif(
            shutil.which("curl") is None, reason="needs curl")),
        pytest.param("nc", marks=pytest.mark.skipif(
            shutil.which("busybox") is None, reason="needs busybox")),
        # A booted OS has busybox but no nc command (report.sh runs there).
        pytest.param("busybox", marks=pytest.mark.skipif(
            shutil.which("busybox") is None, reason="needs busybox")),
    ],
)  # fmt: skip
def test_redeem_once_then_the_refusal_reason_reaches_the_console(
    client: str, boot_http: str, tmp_path: Path
) -> None:
    # Only the chosen HTTP client (and the shell's tools) on PATH, as in an initramfs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "head", "tr", "sleep", "cat", "rm"):
        (bin_dir / tool).symlink_to(shutil.which("busybox") or shutil.which(tool) or tool)
    if client == "curl":
        (bin_dir / "curl").symlink_to(shutil.which("curl") or "curl")
    else:
        (bin_dir / client).symlink_to(shutil.which("busybox") or "busybox")
    busybox = shutil.which("busybox") or "/bin/busybox"
    script = (
        f"PATH={bin_dir}; sb_parse_cmdline 'streamboot.server={boot_http} "
        f"streamboot.nonce={client}nonce0123456789'; sb_redeem; {DUMP}"
    )
    first = values(sh([busybox, "sh"], script, tmp_path))
    assert first["rc"] == "0", first
    assert first["SB_EXPORT"] == "tok-123_abc" and first["SB_WC"] == "client-disk"
    again = values(sh([busybox, "sh"], script, tmp_path))
    assert again["rc"] == "1"
    assert again["SB_ERROR"].startswith(
        "the server refused the session: nonce already redeemed (HTTP 410)"
    ), again


def test_no_answer_from_the_server_fails_after_bounded_retries(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "head", "tr", "cat", "rm", "nc"):
        (bin_dir / tool).symlink_to(busybox)
    # `sleep` is a no-op: the retries still end, and the test does not wait for them.
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    (bin_dir / "sleep").chmod(0o755)
    script = (
        f"PATH={bin_dir}; sb_parse_cmdline 'streamboot.server=http://127.0.0.1:9 "
        f"streamboot.nonce={NONCE}'; sb_redeem; {DUMP}"
    )
    got = values(sh([busybox, "sh"], script, tmp_path))
    assert got["rc"] == "1"
    assert got["SB_ERROR"].startswith("no answer from the boot server at http://127.0.0.1:9")


STATIC_DUMP = 'rc=$?; echo SB_STATIC=$SB_STATIC; echo SB_MAC=$SB_MAC; [ -z "$SB_STATIC" ] || echo IP=$(sb_ip_param "$SB_STATIC"); echo rc=$rc'


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("words", "static", "mac", "ip"),
    [
        ("streamboot.ip=10.77.0.23:10.77.0.1:255.255.255.0 BOOTIF=01-52-54-00-12-ab-56",
         "10.77.0.23:10.77.0.1:255.255.255.0", "52:54:00:12:ab:56",
         "10.77.0.23::10.77.0.1:255.255.255.0:::off"),
        # No router in iPXE's DHCP answer: ${gateway} is empty.
        ("streamboot.ip=10.77.0.23::255.255.0.0", "10.77.0.23::255.255.0.0", "",
         "10.77.0.23:::255.255.0.0:::off"),
        # iPXE had no address (${ip} empty), or a damaged line: DHCP as without it.
        ("streamboot.ip=:: BOOTIF=01-52-54-00-12-34", "", "", ""),
        ("streamboot.ip=10.77.0.300:: BOOTIF=52-54-00-12-34-56", "", "", ""),
        ("streamboot.ip=10.77.0.23", "", "", ""),
        ("streamboot.ip=10.77.0.23:1.2.3.4:255.0.0.0:eth0", "", "", ""),
        ("streamboot.ip=10.77..3:: BOOTIF=01-52-54-00-12-34-5G", "", "", ""),
        ("streamboot.ip=$(reboot)::", "", "", ""),
    ],
)  # fmt: skip
def test_the_address_ipxe_got_spares_a_second_dhcp(
    shell: list[str], words: str, static: str, mac: str, ip: str, tmp_path: Path
) -> None:
    cmdline = f"streamboot.server=http://10.77.0.1:8080 streamboot.nonce={NONCE} {words}"
    got = values(sh(shell, f"sb_parse_cmdline '{cmdline}'; {STATIC_DUMP}", tmp_path))
    assert got["rc"] == "0", got
    assert (got["SB_STATIC"], got["SB_MAC"], got.get("IP", "")) == (static, mac, ip)


@pytest.mark.parametrize("shell", SHELLS)
def test_the_booted_os_reads_the_session_the_initramfs_left(
    shell: list[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    session = run / "session"
    session.write_text(
        "SESSION_ID=7\nWRITE_CACHE=client-disk\nSERVER=http://10.77.0.1:8080\n"
        "MAC=52:54:00:12:34:56\n"
    )
    dump = "rc=$?; echo SB_SERVER=$SB_SERVER; echo SB_MAC=$SB_MAC; echo rc=$rc"
    got = values(sh(shell, f"sb_load_session; {dump}", tmp_path))
    assert got == {"SB_SERVER": "http://10.77.0.1:8080", "SB_MAC": "52:54:00:12:34:56",
                   "rc": "0"}  # fmt: skip
    # Not booted from streamboot, or a file someone tampered with: nothing to report to.
    session.write_text("SERVER=http://10.77.0.1:8080;reboot\nMAC=52:54:00:12:34:56\n")
    assert values(sh(shell, f"sb_load_session; {dump}", tmp_path))["rc"] == "1"
    session.unlink()
    assert values(sh(shell, f"sb_load_session; {dump}", tmp_path))["rc"] == "1"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("persistence", "fstype", "formatted"),
    [
        ("keep", "ext4", False),  # the previous boot's writes stay
        ("keep", "", True),  # a blank partition: formatted once
        ("discard", "ext4", True),  # formatted at every boot
    ],
)
def test_a_kept_local_write_cache_is_mounted_as_it_is(
    shell: list[str], persistence: str, fstype: str, formatted: bool, tmp_path: Path
) -> None:
    """client-disk: the local partition labelled streamboot-wc is formatted only when the
    policy discards (or it holds no filesystem yet); kept, it is mounted as it is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fs = f' TYPE="{fstype}"' if fstype else ""
    # mkfs.ext4 on PATH (no shell function has a dot in its name), the rest as functions,
    # which win over busybox's own applets too.
    (bin_dir / "mkfs.ext4").write_text(f'#!/bin/sh\necho "mkfs $*" >> {log}\n')
    (bin_dir / "mkfs.ext4").chmod(0o755)
    fakes = (
        f'blkid() {{ echo \'/dev/nbd0p1: UUID="{UUID}" TYPE="ext4"\'; '
        f'echo \'/dev/vda1: LABEL="streamboot-wc"{fs} PARTLABEL="streamboot-wc"\'; }}\n'
        f'mount() {{ echo "mount $*" >> {log}; }}\n'
        "udevadm() { :; }\n"
    )
    script = fakes + (
        f"PATH={bin_dir}:$PATH; SB_WC=client-disk SB_PERSISTENCE={persistence}; "
        f"mkdir -p {tmp_path}/run; sb_mount_upper {tmp_path}/upper; echo rc=$?"
    )
    done = sh(shell, script, tmp_path)
    assert done.stdout.strip() == "rc=0", done
    calls = log.read_text().splitlines()
    assert calls[-1] == f"mount -t ext4 /dev/vda1 {tmp_path}/upper"
    assert (calls[0] == "mkfs -q -F -L streamboot-wc -E nodiscard /dev/vda1") is formatted
    assert len(calls) == (2 if formatted else 1)
