"""Fault injection with a live client (docs/reliability.md, `make faults`).

A client (tests/faults/client.py: QEMU's NBD client in its own network namespace) writes
with FUA and flushes through a boot session of a running `streamboot up` while one fault
strikes: kill -9 of each process in turn (stream, cache, registry, boot, NATS, PostgreSQL,
the `up` supervisor, which its init system starts again), a full write-cache file system,
the client's link down for 10 s. Per fault:

- the client rides it out, or gets a clean error (a failed command, never a hang);
- no acknowledged write is lost (the disk is read back and every slot compared);
- no event is lost or duplicated (the log's ids before and after; per-stream versions),
  and the session's SessionClosed still reaches the cache service through JetStream;
- the system is healthy again by itself (`status`: every service alive), and how long the
  client and the system took is recorded.

`make faults` runs them all and writes the table into docs/reliability.md; the normal
suite runs the quick ones (the rest are marked slow and need STREAMBOOT_FAULTS=all).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_system import cache_write_caches
from tests.faults.client import LiveClient
from tests.faults.system import ClientNet, RamFs, System

pytestmark = pytest.mark.timeout(900)
SIZE = 16 << 20
# The full-file-system fault's disk: larger than the write caches' tmpfs, so the client
# keeps writing blocks that need new space while it is full.
RAM_SIZE = 256 << 20
NET_DOWN_S = 10.0
FULL_S = 5.0
# Commands the client must get through after a fault before the disk is checked.
AFTER_OPS = 12
ALL = os.environ.get("STREAMBOOT_FAULTS") == "all"
RESULTS = os.environ.get("STREAMBOOT_FAULTS_RESULTS")
_macs = count(1)

slow = [
    pytest.mark.slow,
    pytest.mark.skipif(not ALL, reason="slow fault: `make faults` (STREAMBOOT_FAULTS=all)"),
]

Env = tuple[System, ClientNet, RamFs]


@pytest.fixture(scope="module")
def vdisks(system: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    sysm, _, _ = system
    images = tmp_path_factory.mktemp("faults")
    for name, size in (("faults", SIZE), ("faults-ram", RAM_SIZE)):
        with open(images / f"{name}.raw", "wb") as f:
            f.truncate(size)
    sysm.cli("vdisk", "import", str(images / "faults.raw"), "--name", "faults")
    sysm.cli(
        "vdisk", "import", str(images / "faults-ram.raw"), "--name", "faults-ram",
        "--write-cache", "server-ram",
    )  # fmt: skip


def stream_versions_ok(log: list[dict[str, Any]]) -> list[str]:
    """Streams whose versions are not 1..n, each once (a lost or a doubled append)."""
    per: dict[str, list[int]] = {}
    for e in log:
        if e.get("version"):
            per.setdefault(e["stream_id"], []).append(e["version"])
    return [s for s, v in per.items() if sorted(v) != list(range(1, len(v) + 1))]


def until(what: Callable[[], bool], timeout_s: float, why: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.1)
    return time.monotonic()


def record(row: dict[str, Any]) -> None:
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_fault(
    env: Env, fault: str, inject: Callable[[], float], vdisk: str = "faults", size: int = SIZE
) -> dict[str, Any]:
    """The whole cycle around ``inject`` (which returns when the fault ended)."""
    sysm, net, _ = env
    mac = f"52:54:00:fa:{os.getpid() % 256:02x}:{next(_macs):02x}"
    sysm.cli("device", "add", mac)
    sysm.cli("assign", mac, vdisk, "--default")
    session = json.loads(sysm.cli("session", "open", mac, "--json"))
    client = LiveClient(session["nbd_uri"], size, net.ns)
    client.start()
    try:
        until(lambda: client.writes >= 12, 120, f"the client does not write: {client.failure}")
        before = sysm.events()
        struck = time.monotonic()
        ended = inject()
        sysm.healthy()
        healthy_at = time.monotonic()
        until(
            lambda: client.first_ok_after(ended) is not None or bool(client.failure),
            180,
            "the client never wrote again",
        )
        ops = len(client.ops)
        until(lambda: len(client.ops) >= ops + AFTER_OPS or bool(client.failure), 180, "stuck")
    finally:
        client.stop()
    assert not client.failure, client.failure
    back_at = client.first_ok_after(ended)
    assert back_at is not None
    last_before = client.last_ok_before(struck) or struck

    disk = Path(sysm.data_dir.parent / f"{fault}.raw")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", session["nbd_uri"], str(disk)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    durable_lost, acked_lost = client.lost(disk.read_bytes())
    disk.unlink()
    sysm.cli("session", "close", session["token"])
    # SessionClosed still reaches its consumers (the log -> relay -> JetStream -> the cache
    # service's durable consumer, which drops the session's write cache).
    until(
        lambda: session["session_id"] not in cache_write_caches(sysm.data_dir),
        60,
        "the cache service never dropped the closed session's write cache",
    )
    after = sysm.events()

    ids = [e["id"] for e in after]
    doubled = [i for i, n in Counter(ids).items() if n > 1]
    missing = {e["id"] for e in before} - set(ids)
    errors = sorted(set(client.errors_after(struck)))
    row = {
        "fault": fault,
        "writes": client.writes,
        "client": "rode it out" if not errors else "clean error: " + "; ".join(errors)[:160],
        "stall_s": round(client.longest_gap(last_before, back_at), 1),
        "recovered_s": round(max(back_at, healthy_at) - ended, 1),
        "acked_lost": len(durable_lost) + len(acked_lost),
        "events_before": len(before),
        "events_lost": len(missing),
        "events_doubled": len(doubled) + len(stream_versions_ok(after)),
    }
    record(row)
    assert not durable_lost, durable_lost[:10]
    # A process crash keeps what reached the kernel: every acknowledged write is there.
    assert not acked_lost, acked_lost[:10]
    assert not missing and not doubled, (missing, doubled)
    assert not stream_versions_ok(after), stream_versions_ok(after)
    return row


def killer(env: Env, name: str) -> Callable[[], float]:
    def inject() -> float:
        sysm = env[0]
        old = sysm.pid(name)
        sysm.kill(name)
        if name != "up":
            sysm.restarted(name, old)
        return time.monotonic()

    return inject


# --- the quick ones (the normal suite) ----------------------------------------------------


@pytest.mark.parametrize("name", ["stream", "cache"])
def test_kill_a_data_path_service(system: Env, vdisks: None, name: str) -> None:
    run_fault(system, f"kill -9 {name}", killer(system, name))


# --- the slow ones (`make faults`) --------------------------------------------------------


@pytest.mark.parametrize("name", ["registry", "boot", "nats-server", "postgres"])
@pytest.mark.parametrize("_", [None], ids=[""])
def test_kill_a_control_plane_process(system: Env, vdisks: None, name: str, _: None) -> None:
    run_fault(system, f"kill -9 {name}", killer(system, name))


def test_kill_the_supervisor(system: Env, vdisks: None) -> None:
    run_fault(system, "kill -9 up (then started again)", killer(system, "up"))


def test_client_link_down(system: Env, vdisks: None) -> None:
    _, net, _ = system

    def inject() -> float:
        net.link(False)
        time.sleep(NET_DOWN_S)
        net.link(True)
        return time.monotonic()

    run_fault(system, f"client link down {NET_DOWN_S:.0f} s", inject)


def test_write_cache_file_system_full(system: Env, vdisks: None) -> None:
    _, _, ram = system

    def inject() -> float:
        ram.fill()
        time.sleep(FULL_S)
        ram.free()
        return time.monotonic()

    row = run_fault(
        system, f"write-cache fs full {FULL_S:.0f} s", inject, vdisk="faults-ram", size=RAM_SIZE
    )
    # The writes that needed new space failed, and said why.
    assert "No space left" in row["client"], row


for _test in (
    test_kill_a_control_plane_process,
    test_kill_the_supervisor,
    test_client_link_down,
    test_write_cache_file_system_full,
):
    for _mark in slow:
        _mark(_test)
