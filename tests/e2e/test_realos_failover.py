"""A real Debian PXE-booted from `streamboot up` keeps running when the stream node serving
its root is killed (docs/failover.md).

The lab (tests/e2e/test_realos_boot.py's, its NATS also on the boot network's server address
10.77.0.1) gets a second stream node on another "host": a network namespace of its own
joined to the lab's boot bridge (10.77.0.2), reaching the lab's NATS over that network.
The device boots with `streamboot-marker.await-failover=1`: at multi-user the marker unit
says STREAMBOOT-AWAIT-FAILOVER; the test then kill -9s the node its session is attached
to; the unit waits for the kernel's "reconnected socket", writes 1 MiB through the moved
connection, reads it back past the page cache, prints STREAMBOOT-FAILOVER and the marker,
and powers off cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.pxe_lab import SERVER_IP, BootLab, bridge_host, kill_namespace, pxe_vm_argv, watch_vm
from tests.e2e.test_realos_boot import (
    BOOT_S,
    MEMORY,
    POWER_DOWN,
    add_device,
    marker,
    realos_lab,
    realos_missing,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realos,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(bool(realos_missing()), reason=f"needs {realos_missing()}"),
]
SECOND_IP = "10.77.0.2"
SECOND_NODE = "stream-second"
LATE_IP = "10.77.0.3"
LATE_NODE = "stream-late"


@pytest.fixture(scope="module")
def lab() -> Iterator[BootLab]:
    """The real-OS lab, its NATS listening on the boot network's server address (inside the
    lab's namespace) so that stream nodes on other "hosts" join it."""
    yield from realos_lab(STREAMBOOT_NATS_LISTEN_HOST=SERVER_IP)


def lab_stream_pid(booted: BootLab) -> int:
    """The pid of the lab's own stream service (a child of `streamboot up`): the only one
    in the lab's namespace, the nodes these tests start run on hosts of their own."""
    pids = subprocess.run(
        ["ip", "netns", "pids", booted.ns], capture_output=True, text=True, check=True
    ).stdout.split()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"services.stream" in argv:
            return int(pid)
    raise AssertionError("the lab's stream service is not running")


@contextlib.contextmanager
def extra_stream_node(lab: BootLab, ip: str, node_id: str) -> Iterator[str]:
    """Another stream service on a host of its own at ``ip`` on the boot network: the lab's
    own's settings (read from its environment: the lab's NATS URL and the stream role's
    credentials), its own node id, address and data dir; running once it heartbeats.
    Yields the host's namespace (kill_namespace kills the node)."""
    raw = Path(f"/proc/{lab_stream_pid(lab)}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
    assert SERVER_IP in env["STREAMBOOT_NATS_URL"], env["STREAMBOOT_NATS_URL"]
    data = lab.root / node_id
    data.mkdir(exist_ok=True)
    env.update(
        STREAMBOOT_NODE_ID=node_id, STREAMBOOT_BIND_HOST=ip,
        STREAMBOOT_PUBLIC_HOST=ip, STREAMBOOT_METRICS_PORT="0",
        STREAMBOOT_DATA_DIR=str(data), STREAMBOOT_VDISK_DIR=str(lab.data_dir / "vdisks"),
    )  # fmt: skip
    log_path = lab.root / f"{node_id}.log"
    with bridge_host(lab.ns, ip) as host, open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host, sys.executable, "-m", "services.stream"], env=env,
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not alive(lab, node_id):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"stream node {node_id} never heartbeated"
                time.sleep(1)
            yield host
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def alive(booted: BootLab, node_id: str) -> bool:
    return any(b.get("node") == node_id and b.get("alive") for b in heartbeats(booted))


@pytest.fixture
def second_node(lab: BootLab) -> Iterator[str]:
    """A second stream service on a host at 10.77.0.2, running before the client boots;
    that host's namespace."""
    with extra_stream_node(lab, SECOND_IP, SECOND_NODE) as host:
        yield host


def heartbeats(booted: BootLab) -> list[dict[str, Any]]:
    out = booted.cli("status", "--json", check=False).stdout
    try:
        return list(json.loads(out).get("instances", []))
    except ValueError:
        return []


def test_a_real_debian_keeps_running_when_its_stream_node_is_killed(
    lab: BootLab,
    second_node: str,
) -> None:
    mac = "52:54:00:88:00:24"
    add_device(lab, mac, "deb-failover")
    lab.cli("device", "set", mac, "--kernel-args",
            "console=ttyS0 panic=-1 streamboot-marker.poweroff=1 "
            "streamboot-marker.await-failover=1")  # fmt: skip
    killed: list[str] = []

    def kill_the_serving_node(_text: str, _vm_pid: int) -> None:
        sid = opened_session(lab, mac)
        attached = [e["data"] for e in lab.events("--type", "SessionAttached")
                    if e["data"]["session_id"] == sid]  # fmt: skip
        node = attached[-1]["stream_node"]
        if node == SECOND_NODE:
            assert kill_namespace(second_node), "nothing ran on the second host"
        else:
            os.kill(lab_stream_pid(lab), signal.SIGKILL)  # `up` restarts it later
        killed.append(node)

    console_path = lab.root / "vm-failover.log"
    run = watch_vm(
        lab.exec(*pxe_vm_argv(mac, 1, memory_mib=MEMORY)), console_path, until=None,
        timeout_s=BOOT_S, watch=("STREAMBOOT-AWAIT-FAILOVER",), on_seen=kill_the_serving_node,
    )  # fmt: skip
    console = run.console
    assert killed, f"the VM never reached multi-user:\n{console[-5000:]}"
    assert "STREAMBOOT-FAILOVER same=yes io-errors=0" in console, console[-5000:]
    assert "reattached to stream node" in console
    assert marker(console)["hostname"] == "deb-failover"
    assert POWER_DOWN in console, console[-3000:]
    # The session's events show the move: attached on the killed node, last on another
    # (on a loaded machine a request slower than the helper's I/O timeout moves it earlier
    # too, so the killed node need not be the first).
    sid = opened_session(lab, mac)
    nodes = [e["data"]["stream_node"] for e in lab.events("--type", "SessionAttached")
             if e["data"]["session_id"] == sid]  # fmt: skip
    assert killed[0] in nodes and nodes[-1] != killed[0], (killed, nodes)


def test_a_real_debian_finds_a_node_started_after_its_boot_when_its_own_dies(
    lab: BootLab,
) -> None:
    """The client's hand-off named only the lab's stream node; a node that comes up later
    is the only live one once that node is killed: the helper finds it through the boot
    service (GET /failover-nodes) and moves the root there."""
    mac = "52:54:00:88:00:25"
    add_device(lab, mac, "deb-refresh")
    lab.cli("device", "set", mac, "--kernel-args",
            "console=ttyS0 panic=-1 streamboot-marker.poweroff=1 "
            "streamboot-marker.await-failover=1")  # fmt: skip
    # No other stream node alive at the hand-off (one an earlier test killed heartbeats
    # on for a while).
    deadline = time.monotonic() + 120
    while alive(lab, SECOND_NODE):
        assert time.monotonic() < deadline, "the earlier test's second node stays alive"
        time.sleep(1)
    nodes = contextlib.ExitStack()  # stopped once the VM is done
    killed: list[int] = []

    def start_a_node_and_kill_the_serving_one(_text: str, _vm_pid: int) -> None:
        nodes.enter_context(extra_stream_node(lab, LATE_IP, LATE_NODE))
        pid = lab_stream_pid(lab)
        os.kill(pid, signal.SIGKILL)  # `up` restarts it later
        killed.append(pid)

    console_path = lab.root / "vm-refresh.log"
    with nodes:
        run = watch_vm(
            lab.exec(*pxe_vm_argv(mac, 1, memory_mib=MEMORY)), console_path, until=None,
            timeout_s=BOOT_S, watch=("STREAMBOOT-AWAIT-FAILOVER",),
            on_seen=start_a_node_and_kill_the_serving_one,
        )  # fmt: skip
    console = run.console
    assert killed, f"the VM never reached multi-user:\n{console[-5000:]}"
    assert "streamboot: the boot service names" in console, console[-5000:]
    assert f"reattached to stream node {LATE_IP}:" in console, console[-5000:]
    assert "STREAMBOOT-FAILOVER same=yes io-errors=0" in console, console[-5000:]
    assert marker(console)["hostname"] == "deb-refresh"
    assert POWER_DOWN in console, console[-3000:]
    sid = opened_session(lab, mac)
    attached = [e["data"]["stream_node"] for e in lab.events("--type", "SessionAttached")
                if e["data"]["session_id"] == sid]  # fmt: skip
    assert attached[-1] == LATE_NODE and LATE_NODE not in attached[:1], attached


def opened_session(booted: BootLab, mac: str) -> str:
    [opened] = [e for e in booted.events("--mac", mac) if e["type"] == "SessionOpened"][-1:]
    return str(opened["data"]["session_id"])
