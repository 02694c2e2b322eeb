"""The whole system from the README's point of view: `streamboot up`, then the CLI.

A device is added, a vdisk imported and assigned, a boot session opened; real clients read
the session's export through the stream service (which resolves the token through the
registry over NATS); the event log tells the story; `status` shows every service; closing
the session ends access; a restart keeps the events; a crash of the cache service loses
no write and fails no client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest

from shared.settings import nats_password_file
from streamboot.embedded.proc import free_port
from tests.cache.ftpd import url as ftp_url
from tests.e2e.test_up import AVAILABLE, STREAMBOOT, Up, assert_all_gone

MAC = "52:54:00:e2:e0:01"
MAC_FTP = "52:54:00:e2:e0:02"
MAC_CRASH = "52:54:00:e2:e0:03"
MAC_OUTAGE = "52:54:00:e2:e0:04"
ROOT = Path(__file__).resolve().parents[2]


def cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")}
    done = subprocess.run(
        [str(STREAMBOOT), *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check:
        assert done.returncode == 0, f"streamboot {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def cli_json(data_dir: Path, *args: str) -> Any:
    return json.loads(cli(data_dir, *args, "--json").stdout)


def events(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    out = cli(data_dir, "events", "list", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def provision(data_dir: Path, mac: str, image: Path, vdisk: str, *device_args: str) -> None:
    """A device with ``vdisk`` (imported from ``image``) as its default, through the CLI."""
    cli(data_dir, "device", "add", mac, *device_args)
    cli(data_dir, "vdisk", "import", str(image), "--name", vdisk)
    cli(data_dir, "assign", mac, vdisk, "--default")


def qemu_io(uri: str, *commands: str) -> None:
    args = [x for c in commands for x in ("-c", c)]
    done = subprocess.run(
        ["qemu-io", "-f", "raw", *args, uri], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr


def test_boot_session_streams_through_the_running_system(data_dir: Path, tmp_path: Path) -> None:
    assert {"registry", "stream", "cache"} <= set(AVAILABLE)
    image = tmp_path / "golden.raw"
    image.write_bytes(os.urandom(8 * 1024 * 1024))
    golden = hashlib.sha256(image.read_bytes()).hexdigest()

    # The session is idle between its clients while the CLI inspects it; on a loaded
    # machine that can outlast the default detach grace, which is not what this test is about.
    up = Up(data_dir, AVAILABLE, STREAMBOOT_SESSION_DETACH_GRACE_S="600")
    try:
        up.wait_running()
        status = wait_all_alive(data_dir)
        assert set(status["endpoints"]) >= {
            "nats_url",
            "database_url",
            "api_url",
            "nbd",
            "http_stream",
            "iscsi",
        }

        provision(data_dir, MAC, image, "golden", "--hostname", "e2e-001")
        session = cli_json(data_dir, "session", "open", MAC)
        assert {"token", "nbd_uri", "http_url", "vdisk", "version"} <= set(session)
        assert session["vdisk"] == "golden" and session["version"] == 1

        # A second open for the same machine is refused while the first is live.
        again = cli(data_dir, "session", "open", MAC, check=False)
        assert again.returncode != 0 and "session" in (again.stdout + again.stderr).lower()

        # The registry told the stream node, which placed the session's write cache at the
        # cache service before any client connected (services/stream/announce.py).
        for _ in range(30):
            [listed] = cli_json(data_dir, "session", "list")
            if listed.get("write_cache_node"):
                break
            time.sleep(0.1)
        assert listed["write_cache_node"] and listed["write_cache_used"] == 0, listed

        # Real clients read the export through the stream service.
        copy = tmp_path / "copy.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", session["nbd_uri"], str(copy)],
            check=True,
            timeout=120,
        )
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == golden
        ranged = subprocess.run(
            ["curl", "-sf", "-r", "4096-8191", session["http_url"]],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert ranged == image.read_bytes()[4096:8192]

        # A write lands in the session's write cache (held by the cache service), and
        # `session list` shows how much of it is used.
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", session["nbd_uri"]],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        [listed] = cli_json(data_dir, "session", "list")
        assert listed["session_id"] == session["session_id"]
        assert listed["write_cache_used"] >= 64 * 1024
        assert listed["write_cache_node"]  # the cache node holding it (there may be several)
        assert "MiB" in cli(data_dir, "session", "list").stdout  # the usage column

        # `status` adds up what the stream node streamed (its heartbeat, every 2 s).
        least = len(image.read_bytes()) + 4096 + 64 * 1024
        for _ in range(50):
            figures = json.loads(cli(data_dir, "status", "--json").stdout)["figures"]
            if figures["bytes_streamed"] >= least:
                break
            time.sleep(0.2)
        assert figures["bytes_streamed"] >= least, figures

        # The log holds the story of this session, in order.
        story = [
            e["type"] for e in events(data_dir, "--stream", f"session-{session['session_id']}")
        ]
        assert story[0] == "SessionOpened"
        assert "SessionAttached" in story and "BlocksRequested" in story
        rejected = events(data_dir, "--type", "SessionConflictRejected")
        assert rejected and rejected[-1]["data"]["mac"] == MAC
        by_mac = [e["type"] for e in events(data_dir, "--mac", MAC)]
        assert by_mac[0] == "DeviceRegistered" and "SessionOpened" in by_mac

        cli(data_dir, "session", "close", session["token"])
        refused = subprocess.run(
            ["qemu-img", "info", session["nbd_uri"]], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0
        assert "SessionClosed" in [
            e["type"] for e in events(data_dir, "--stream", f"session-{session['session_id']}")
        ]
    finally:
        assert up.proc.poll() is None, f"up exited during the test:\n{up.output}"
        children = up.descendants()
        assert up.stop() == 0, up.output
        assert_all_gone(children)

    # A second `up` on the same data dir still has everything.
    up = Up(data_dir, AVAILABLE)
    try:
        up.wait_running()
        wait_all_alive(data_dir)
        assert [d["mac"] for d in cli_json(data_dir, "device", "list")] == [MAC]
        closed = events(data_dir, "--type", "SessionClosed")
        assert [e["data"]["session_id"] for e in closed] == [session["session_id"]]
    finally:
        assert up.stop() == 0, up.output
    assert hashlib.sha256(image.read_bytes()).hexdigest() == golden


def test_a_vdisk_on_an_ftp_share_streams_through_the_cache_service(
    data_dir: Path, tmp_path: Path
) -> None:
    """A vdisk whose store is an FTP share (STREAMBOOT_CACHE_STORES, `vdisk import
    --store`): the stream node reads it through the cache service's read cache, which reads
    the share (aioftp's own server), not the registry's vdisk dir."""
    share = tmp_path / "share"
    share.mkdir()
    port = free_port()
    ftpd = subprocess.Popen(
        [sys.executable, "-m", "tests.cache.ftpd", str(share), str(port), "0.002"],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    image = tmp_path / "golden.raw"
    image.write_bytes(os.urandom(8 * 1024 * 1024))
    golden = hashlib.sha256(image.read_bytes()).hexdigest()
    up = Up(data_dir, AVAILABLE, STREAMBOOT_CACHE_STORES=json.dumps({"share": ftp_url(port)}))
    try:
        assert ftpd.stdout is not None and ftpd.stdout.readline().startswith(b"READY")
        up.wait_running()
        wait_all_alive(data_dir)
        unknown = cli(
            data_dir, "vdisk", "import", str(image), "--name", "g", "--store", "nas", check=False
        )
        assert unknown.returncode != 0
        assert "unknown store 'nas': configured are local, share" in unknown.stdout + unknown.stderr

        cli(data_dir, "vdisk", "import", str(image), "--name", "shared", "--store", "share")
        assert cli_json(data_dir, "vdisk", "show", "shared")["store"] == "share"
        # The share holds the vdisk's files (an operator's NAS exporting the vdisk dir);
        # the registry's own copy is then spoiled: every byte must come over FTP.
        root = Path(cli_json(data_dir, "registry", "status")["vdisk_root"])
        shutil.copytree(root / "shared", share / "shared")
        for layer in (root / "shared").iterdir():
            layer.write_bytes(bytes(layer.stat().st_size))

        cli(data_dir, "device", "add", MAC_FTP)
        cli(data_dir, "assign", MAC_FTP, "shared", "--default")
        session = cli_json(data_dir, "session", "open", MAC_FTP)
        copy = tmp_path / "copy.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", session["nbd_uri"], str(copy)],
            check=True, timeout=120,
        )  # fmt: skip
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == golden

        # Moved back to the local store, a new session reads the (spoiled) local copy.
        cli(data_dir, "session", "close", session["token"])
        cli(data_dir, "vdisk", "set", "shared", "--store", "local")
        session = cli_json(data_dir, "session", "open", MAC_FTP)
        local = subprocess.run(
            ["curl", "-sf", "-r", "0-4095", session["http_url"]],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        assert local == bytes(4096)
    finally:
        ftpd.kill()
        ftpd.wait()
        assert up.proc.poll() is None, f"up exited during the test:\n{up.output}"
        assert up.stop() == 0, up.output


def test_a_crash_of_the_cache_service_loses_no_write_and_fails_no_client(
    data_dir: Path, tmp_path: Path
) -> None:
    """`up` starts the killed cache service again; the client's writes meanwhile wait for
    it (the stream's ride-out), then every acknowledged write reads back."""
    image = tmp_path / "golden.raw"
    image.write_bytes(os.urandom(8 * 1024 * 1024))
    up = Up(data_dir, AVAILABLE)
    try:
        up.wait_running()
        wait_all_alive(data_dir)
        provision(data_dir, MAC_CRASH, image, "crashy", "--hostname", "e2e-003")
        uri = cli_json(data_dir, "session", "open", MAC_CRASH)["nbd_uri"]
        qemu_io(uri, "write -P 0x5a 1M 64k")  # acknowledged, not flushed
        cache = json.loads((data_dir / "runtime.json").read_text())["services"]["cache"]
        os.kill(cache, signal.SIGKILL)
        # At once, while the service is down and being started again.
        qemu_io(uri, "write -P 0x6b 2M 64k", "flush", "read -P 0x5a 1M 64k", "read -P 0x6b 2M 64k")
        assert "service cache exited with code -9" in up.output
        assert "service cache started again" in up.output
        assert "holding the session's writes" in up.output  # the stream node waited
        [listed] = cli_json(data_dir, "session", "list")
        assert listed["write_cache_used"] >= 128 * 1024, listed
        qemu_io(uri, "read -P 0x5a 1M 64k", "read -P 0x6b 2M 64k")  # a new connection
    finally:
        assert up.proc.poll() is None, f"up exited during the test:\n{up.output}"
        assert up.stop() == 0, up.output


def cache_write_caches(data_dir: Path) -> set[str]:
    """The session ids of the write caches the cache service holds."""
    nats_url = json.loads((data_dir / "runtime.json").read_text())["nats_url"]
    # As the operator's CLI asks: the `cli` user of the data dir's secrets.
    password = nats_password_file(data_dir, "cli").read_text().strip()

    async def ask() -> set[str]:
        nc = await nats.connect(nats_url, user="cli", password=password)
        try:
            reply = await nc.request("streamboot.cache.stats", b"{}", timeout=10)
        finally:
            await nc.close()
        return {w["session_id"] for w in json.loads(reply.data)["write_caches"]}

    return asyncio.run(ask())


def until_it_answers(data_dir: Path, *args: str, timeout_s: float = 60) -> str:
    """A CLI command tried until it succeeds (the system is riding out a restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = cli(data_dir, *args, check=False)
        if done.returncode == 0:
            return done.stdout
        assert time.monotonic() < deadline, f"streamboot {' '.join(args)}:\n{done.stderr}"
        time.sleep(0.5)


def test_nats_and_postgres_dying_are_started_again_and_the_system_answers(
    data_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "outage.raw"
    image.write_bytes(os.urandom(1024 * 1024))
    up = Up(data_dir, AVAILABLE)
    try:
        up.wait_running()
        wait_all_alive(data_dir)
        services = json.loads((data_dir / "runtime.json").read_text())["services"]
        provision(data_dir, MAC_OUTAGE, image, "outage")
        for n, server in enumerate(("nats-server", "postgres"), start=1):
            [victim] = [p for p in psutil.Process(up.proc.pid).children() if p.name() == server]
            victim.kill()
            deadline = time.monotonic() + 120
            while f"{server} started again" not in up.output:
                assert up.proc.poll() is None, f"up exited:\n{up.output}"
                assert time.monotonic() < deadline, f"{server} not started again:\n{up.output}"
                time.sleep(0.2)
            assert f"{server} exited with code {-signal.SIGKILL}" in up.output
            # The system answers: a mutation goes through the registry into the log.
            until_it_answers(data_dir, "device", "add", f"52:54:00:e2:e1:0{n}")
        session = json.loads(until_it_answers(data_dir, "session", "open", MAC_OUTAGE, "--json"))
        qemu_io(session["nbd_uri"], "write -P 7 0 4k", "read -P 7 0 4k", "read 8k 4k")
        # Events still flow through the relay and JetStream to their consumers: the cache
        # service's durable consumer of SessionClosed drops the session's write cache.
        sid = session["session_id"]
        assert sid in cache_write_caches(data_dir)
        cli(data_dir, "session", "close", session["token"])
        deadline = time.monotonic() + 60
        while sid in cache_write_caches(data_dir):
            assert time.monotonic() < deadline, f"write cache of {sid} not dropped:\n{up.output}"
            time.sleep(0.2)
        # The services rode both restarts out: none of them was started again.
        assert json.loads((data_dir / "runtime.json").read_text())["services"] == services
        macs = {e["data"].get("mac") for e in events(data_dir, "--type", "DeviceRegistered")}
        assert {"52:54:00:e2:e1:01", "52:54:00:e2:e1:02", MAC_OUTAGE} <= macs
    finally:
        assert up.stop() == 0, up.output


def wait_all_alive(data_dir: Path, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        done = cli(data_dir, "status", "--json", check=False)
        status = json.loads(done.stdout)
        alive = {name for name, s in status["services"].items() if s["alive"]}
        if set(AVAILABLE) <= alive:
            for name in AVAILABLE:
                assert status["services"][name]["version"]
                assert status["services"][name]["uptime_s"] >= 0
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"services not alive after {timeout_s}s: {status}")
        time.sleep(0.5)
