"""A running Linux client keeps its disk when its stream node is killed (docs/failover.md).

The guest (tests/failover/guest.py: Debian's kernel, busybox, streamboot-nbd) attaches a
session's export from two stream nodes, real processes on the cache service's write
caches, and writes and reads through the kernel's nbd driver while the test kill -9s the
node serving it (after a pause longer than the helper's handshake timeouts, which an
idle connection outlives): first with no other node alive (the client waits and says so on its
console; the node comes up later), then while a write runs with the other node alive. Every
round's data reads back, the kernel logs no I/O error, and the nodes' SessionAttached
events show the session on both.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from streamboot.embedded.proc import free_port
from tests.cache.conftest import Proc, System, export
from tests.failover.guest import HOST, Guest, build_initramfs, missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(missing()), reason=f"needs {missing()}"),
]

# Each "go" line: write round k's 256 KiB (pattern made in the guest) at block k*100 in
# 16 KiB pieces (each synced), then read back every round so far from the device with the
# page cache dropped, so the reads go to whichever node serves now.
SCRIPT = """
k=0
while read cmd; do
    case "$cmd" in
    go)
        k=$((k + 1))
        dd if=/dev/urandom of=/tmp/r$k bs=16384 count=16 2> /dev/null
        echo "GUEST-WRITING $k"
        i=0
        while [ $i -lt 16 ]; do
            dd if=/tmp/r$k of=/dev/nbd0 bs=16384 skip=$i seek=$((k * 25 + i)) count=1 \\
                conv=fsync,notrunc 2> /dev/null || echo "GUEST-WRITE-FAILED $k $i"
            i=$((i + 1))
        done
        echo 3 > /proc/sys/vm/drop_caches
        bad=0
        j=1
        while [ $j -le $k ]; do
            want=$(md5sum < /tmp/r$j)
            got=$(dd if=/dev/nbd0 bs=16384 skip=$((j * 25)) count=16 2> /dev/null | md5sum)
            [ "$want" = "$got" ] || bad=$((bad + 1))
            j=$((j + 1))
        done
        echo "GUEST-ROUND $k bad=$bad"
        ;;
    idle)
        # Longer than the helper's handshake timeouts: an idle device keeps its connection.
        sleep 6
        dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 iflag=direct 2> /dev/null
        echo "GUEST-IDLE dropped=$(dmesg | grep -c 'Receive control failed (result -11)')"
        ;;
    end)
        echo "GUEST-IOERRORS $(dmesg | grep -c -i -e 'I/O error' -e 'Buffer I/O')"
        dmesg | grep -i nbd
        break
        ;;
    esac
done
"""


async def start_node(s: System, exports: dict[str, Any], name: str, port: int) -> Proc:
    node, _ = await s.start_node(
        exports, name, "--port", str(port), "--publish-events", "--node-id", name
    )
    return node


async def test_a_running_client_survives_kill9_of_its_stream_node(
    system, base_image: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    await s.start_cache()
    token = "failover-guest-token-0123456789"
    ex = export(token, base_image)
    port_a, port_b = free_port(), free_port()
    attached: list[dict[str, Any]] = []
    nc = await nats.connect(s.nats_url)

    async def on_attached(msg: Msg) -> None:
        attached.append(json.loads(msg.data))

    sub = await nc.subscribe("events.SessionAttached.>", cb=on_attached)
    node_a = await start_node(s, ex, "a", port_a)
    initramfs = await asyncio.to_thread(
        build_initramfs, tmp_path, token, [f"{HOST}:{port_a}", f"{HOST}:{port_b}"], SCRIPT
    )
    guest = Guest(initramfs, tmp_path / "console.log")
    try:
        at = await asyncio.to_thread(guest.wait_for, "GUEST-ATTACHED", 300)
        guest.send("go")
        at = await asyncio.to_thread(guest.wait_for, "GUEST-ROUND 1 bad=0", 300, at)
        guest.send("idle")
        at = await asyncio.to_thread(guest.wait_for, "GUEST-IDLE dropped=0", 120, at)

        # No other node alive: the client waits, says so, and loses nothing.
        node_a.kill9()
        at = await asyncio.to_thread(guest.wait_for, "no live stream node answers", 120, at)
        await start_node(s, ex, "b", port_b)
        at = await asyncio.to_thread(
            guest.wait_for, f"reattached to stream node {HOST}:{port_b}", 120, at
        )
        guest.send("go")
        at = await asyncio.to_thread(guest.wait_for, "GUEST-ROUND 2 bad=0", 300, at)

        # The other node alive, its node killed in the middle of a write.
        await start_node(s, ex, "a2", port_a)
        guest.send("go")
        at = await asyncio.to_thread(guest.wait_for, "GUEST-WRITING 3", 120, at)
        s.procs[-2].kill9()  # node b
        at = await asyncio.to_thread(
            guest.wait_for, f"reattached to stream node {HOST}:{port_a}", 120, at
        )
        at = await asyncio.to_thread(guest.wait_for, "GUEST-ROUND 3 bad=0", 300, at)
        guest.send("end")
        await asyncio.to_thread(guest.wait_for, "GUEST-DONE", 120, at)
    finally:
        guest.stop()
        await sub.unsubscribe()
        await nc.close()
    console = guest.text
    assert "GUEST-IOERRORS 0" in console, console[-4000:]
    assert "GUEST-WRITE-FAILED" not in console
    # The session's events show the move: attached on a, then b, then a's successor.
    nodes = [e["data"]["stream_node"] for e in attached]
    assert {e["data"]["session_id"] for e in attached} == {f"session-{token}"}
    assert [n for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n] == ["a", "b", "a2"]
