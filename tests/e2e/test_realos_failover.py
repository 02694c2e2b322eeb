"""A real Debian PXE-booted from `streamboot up` keeps running when the stream node serving
its root is killed (docs/failover.md).

The lab (tests/e2e/test_realos_boot.py's) gets a second stream node on a second address of
the boot network (10.77.0.2, the same namespace: the lab's NATS listens on its loopback).
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

from tests.e2e.pxe_lab import BootLab, pxe_vm_argv, watch_vm
from tests.e2e.test_realos_boot import (  # noqa: F401  (lab: the fixture)
    BOOT_S,
    MEMORY,
    POWER_DOWN,
    add_device,
    lab,
    marker,
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


def lab_stream_pid(booted: BootLab) -> int:
    """The pid of the booted's own stream service (a child of `streamboot up`), not one of
    the nodes these tests start in the same namespace (pids wrap: their order says
    nothing)."""
    pids = subprocess.run(
        ["ip", "netns", "pids", booted.ns], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = {f"STREAMBOOT_NODE_ID={n}".encode() for n in (SECOND_NODE, LATE_NODE)}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"services.stream" in argv and not env & ours:
            return int(pid)
    raise AssertionError("the lab's stream service is not running")


@contextlib.contextmanager
def extra_stream_node(lab: BootLab, ip: str, node_id: str) -> Iterator[subprocess.Popen[bytes]]:  # noqa: F811
    """Another stream service on ``ip`` of the boot network: the lab's own's settings (read
    from its environment), its own node id, address and data dir; running once it
    heartbeats."""
    subprocess.run(lab.exec("ip", "addr", "add", f"{ip}/24", "dev", "br0"), check=True)
    raw = Path(f"/proc/{lab_stream_pid(lab)}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
    data = lab.root / node_id
    data.mkdir(exist_ok=True)
    env.update(
        STREAMBOOT_NODE_ID=node_id, STREAMBOOT_BIND_HOST=ip,
        STREAMBOOT_PUBLIC_HOST=ip, STREAMBOOT_METRICS_PORT="0",
        STREAMBOOT_DATA_DIR=str(data), STREAMBOOT_VDISK_DIR=str(lab.data_dir / "vdisks"),
    )  # fmt: skip
    log_path = lab.root / f"{node_id}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        lab.exec(sys.executable, "-m", "services.stream"), env=env, stdout=log,
        stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not alive(lab, node_id):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"stream node {node_id} never heartbeated"
            time.sleep(1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()
        subprocess.run(lab.exec("ip", "addr", "del", f"{ip}/24", "dev", "br0"))


def alive(booted: BootLab, node_id: str) -> bool:
    return any(b.get("node") == node_id and b.get("alive") for b in heartbeats(booted))


@pytest.fixture
def second_node(lab: BootLab) -> Iterator[subprocess.Popen[bytes]]:  # noqa: F811
    """A second stream service on 10.77.0.2, running before the client boots."""
    with extra_stream_node(lab, SECOND_IP, SECOND_NODE) as proc:
        yield proc


def heartbeats(booted: BootLab) -> list[dict[str, Any]]:
    out = booted.cli("status", "--json", check=False).stdout
    try:
        return list(json.loads(out).get("instances", []))
    except ValueError:
        return []


def test_a_real_debian_keeps_running_when_its_stream_node_is_killed(
    lab: BootLab,  # noqa: F811
    second_node: subprocess.Popen[bytes],
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
            second_node.send_signal(signal.SIGKILL)
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
    lab: BootLab,  # noqa: F811
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
