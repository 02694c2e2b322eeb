"""A guest's kernel times its NBD requests out on a live node that stalls (longer than the
helper's 3 s I/O timeout, as an overloaded host does): the helper reattaches to the same
node with the same token, again and again, and the guest's data survives. The stall is
real: the stream node's process is stopped (SIGSTOP) while the guest reads and writes,
then continued, so the old connection's end and the new one's handshake reach the node in
whatever order the kernel sends them. Stopping QEMU instead does not make the guest's
requests time out (its clock does not see the pause as a late reply). Marked realos: a
VM run too long for the quick suite (make test-realos)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from streamboot.embedded.proc import free_port
from tests.cache.conftest import export
from tests.failover.guest import HOST, Guest, build_initramfs, missing
from tests.failover.test_nbd_failover import start_node

pytestmark = [
    pytest.mark.realos,
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(missing()), reason=f"needs {missing()}"),
]

# "busy": write and read back 16 KiB blocks until told to stop (a file in /tmp says so).
SCRIPT = """
while read cmd; do
    case "$cmd" in
    busy)
        (
            n=0
            while [ ! -e /tmp/stop ]; do
                n=$((n + 1))
                dd if=/dev/urandom of=/tmp/b bs=16384 count=1 2> /dev/null
                dd if=/tmp/b of=/dev/nbd0 bs=16384 seek=$((n % 64)) count=1 \\
                    conv=fsync,notrunc 2> /dev/null || echo "GUEST-WRITE-FAILED $n"
                dd if=/dev/nbd0 of=/tmp/c bs=16384 skip=$((n % 64)) count=1 \\
                    iflag=direct 2> /dev/null
                cmp -s /tmp/b /tmp/c || echo "GUEST-MISMATCH $n"
                echo "GUEST-OP $n"
            done
            echo GUEST-STOPPED
        ) &
        ;;
    end)
        touch /tmp/stop
        sleep 3
        echo "GUEST-IOERRORS $(dmesg | grep -c -i -e 'I/O error' -e 'Buffer I/O')"
        dmesg | grep -i nbd
        break
        ;;
    esac
done
"""

ROUNDS = 5


async def test_a_starved_guest_reattaches_to_its_live_node_each_time(
    system, base_image: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    await s.start_cache()
    token = "starved-guest-token-0123456789"
    ex = export(token, base_image)
    port = free_port()
    node = await start_node(s, ex, "a", port)
    initramfs = await asyncio.to_thread(
        build_initramfs, tmp_path, token, [f"{HOST}:{port}"], SCRIPT, ("-t", "3")
    )
    guest = Guest(initramfs, tmp_path / "console.log")
    try:
        at = await asyncio.to_thread(guest.wait_for, "GUEST-ATTACHED", 300)
        guest.send("busy")
        at = await asyncio.to_thread(guest.wait_for, "GUEST-OP 3", 120, at)
        for k in range(ROUNDS):
            os.kill(node.p.pid, signal.SIGSTOP)
            await asyncio.sleep(4 + 2 * k)
            os.kill(node.p.pid, signal.SIGCONT)
            at = await asyncio.to_thread(guest.wait_for, "reattached to stream node", 120, at)
            at = await asyncio.to_thread(guest.wait_for, "GUEST-OP", 120, at)
        guest.send("end")
        await asyncio.to_thread(guest.wait_for, "GUEST-IOERRORS", 120, at)
    finally:
        guest.stop()
    console = guest.text
    assert "GUEST-IOERRORS 0" in console, console[-4000:]
    assert "GUEST-WRITE-FAILED" not in console and "GUEST-MISMATCH" not in console
