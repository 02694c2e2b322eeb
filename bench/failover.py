"""How long a running client is stalled when its stream node dies (docs/failover.md).

    uv run python bench/failover.py [--kills 10] [--io-timeout 3]

A TCG guest (tests/failover/guest.py: Debian's kernel, busybox, streamboot-nbd) reads 4 KiB
blocks of its NBD disk with O_DIRECT, one after another, and keeps the longest gap between
two completed reads (its /proc/uptime, 10 ms steps). The host kill -9s the stream node
serving it ``--kills`` times; the gap around each kill is the stall: from the kill to the
first read completed after it. Two ways to come back, in the same run:

- ``failover``: two stream nodes on the cache service's write caches; the client moves to
  the other one (the killed one is restarted afterwards, so the next kill has a spare).
- ``same-node``: one stream node, restarted on its port right after the kill; the client
  reconnects to it: the best a single-node design can do.

Reported: the median, min and max stall per way, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bootstorm import Streamboot, embedded_nats  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402
from tests.cache.conftest import Proc  # noqa: E402
from tests.failover.guest import HOST, Guest, build_initramfs, missing  # noqa: E402

SIZE = 64 << 20
TOKEN = "failover-bench-token-0123456789"
# Reads until told to report (the longest gap since the last report) or to stop; a line
# on the console sets a flag file the loop looks at after each read.
SCRIPT = """
(while read cmd; do touch /tmp/$cmd; done) < /dev/console &
n=0
max=0
read up rest < /proc/uptime
last=${up%.*}${up#*.}
echo GUEST-READING
while [ ! -e /tmp/stop ]; do
    dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 skip=$(((n * 7919) % 16000)) iflag=direct \\
        2> /dev/null || echo GUEST-READ-FAILED
    n=$((n + 1))
    read up rest < /proc/uptime
    now=${up%.*}${up#*.}
    gap=$((now - last))
    [ $gap -gt $max ] && max=$gap
    last=$now
    if [ -e /tmp/report ]; then
        rm /tmp/report
        echo "GUEST-GAP $max reads=$n"
        max=0
    fi
done
echo "GUEST-IOERRORS $(dmesg | grep -c -i -e 'I/O error' -e 'Buffer I/O')"
"""


def node_proc(rig: Streamboot, work: Path, name: str, port: int) -> Proc:
    env = {
        "STREAMBOOT_NATS_URL": rig.nats_url,
        "STREAMBOOT_DATA_DIR": str(work / "data"),
        "STREAMBOOT_NODE_ID": f"bench-{work.name}",
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_LOG_LEVEL": "WARNING",
    }
    for attempt in range(3):  # a loaded machine refuses a fork now and then
        proc = Proc(
            [sys.executable, "-m", "tests.cache.stream_node", rig.nats_url,
             str(work / "exports.json"), "--port", str(port), "--node-id", name],
            env, work / f"node-{name}-{attempt}.log",
        )  # fmt: skip
        try:
            proc.ready_line()
            return proc
        except AssertionError:
            proc.stop()
            if attempt == 2:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def gap_s(guest: Guest, at: int) -> tuple[float, int]:
    """Asks the guest for its longest gap since the last ask: (seconds, console offset)."""
    guest.send("report")
    end = guest.wait_for("GUEST-GAP ", 300, at)
    line = guest.text[end:].split("\n", 1)[0]
    return int(line.split()[0]) / 100, end


def run_way(
    work: Path, nats_url: str, image: Path, way: str, kills: int, timeout: int
) -> list[float]:
    # A token per way: a write cache's placement outlives the way's cache service.
    token = f"{TOKEN}-{way}"
    rig = Streamboot(work, nats_url, image, "local", [token], None)
    rig.node.stop()  # the rig's own node has a port of its choice: ours are fixed
    ports = [free_port(), free_port()] if way == "failover" else [free_port()]
    nodes = [node_proc(rig, work, f"n{i}", p) for i, p in enumerate(ports)]
    initramfs = build_initramfs(
        work, token, [f"{HOST}:{p}" for p in ports], SCRIPT, ("-t", str(timeout))
    )
    guest = Guest(initramfs, work / "console.log")
    stalls: list[float] = []
    serving = 0
    try:
        at = guest.wait_for("GUEST-READING", 300)
        for k in range(kills):
            time.sleep(1.0)  # reads flowing again before the next kill
            _, at = gap_s(guest, at)
            nodes[serving].kill9()
            if way == "same-node":
                nodes[serving] = node_proc(rig, work, f"n{serving}-{k}", ports[serving])
            at = guest.wait_for("reattached to stream node", 300, at)
            stall, at = gap_s(guest, at)
            stalls.append(stall)
            print(f"  {way} kill {k + 1}: stalled {stall:.2f} s", flush=True)
            if way == "failover":
                nodes[serving] = node_proc(rig, work, f"n{serving}-{k}", ports[serving])
                serving = 1 - serving
        guest.send("stop")
        guest.wait_for("GUEST-IOERRORS", 120, at)
    except AssertionError:
        for log in sorted(work.glob("node-*.log")):
            print(f"--- {log.name}:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        guest.stop()
        for n in nodes:
            n.stop()
        rig.cache.stop()
    tail = guest.text[guest.text.rfind("GUEST-IOERRORS") :].split("\n", 1)[0]
    print(f"  {way}: {tail}; read failures: {guest.text.count('GUEST-READ-FAILED')}")
    return stalls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--io-timeout", type=int, default=3, help="streamboot-nbd -t")
    ap.add_argument("--ways", default="failover,same-node", help="which ways to run")
    args = ap.parse_args()
    if missing():
        sys.exit(f"bench/failover.py needs {missing()}")
    with tempfile.TemporaryDirectory(prefix="sb-failover-") as tmp:
        work = Path(tmp)
        image = work / "golden" / "base.raw"
        image.parent.mkdir()
        image.write_bytes(os.urandom(SIZE))
        results: dict[str, list[float]] = {}
        with embedded_nats(work) as (nats_url, _pid):
            for way in args.ways.split(","):
                sub = work / way
                sub.mkdir()
                results[way] = run_way(sub, nats_url, image, way, args.kills, args.io_timeout)
    print(f"\nstall from kill -9 to the first completed read ({args.kills} kills, "
          f"streamboot-nbd -t {args.io_timeout}):")  # fmt: skip
    for way, stalls in results.items():
        print(f"  {way:10s} median {statistics.median(stalls):.2f} s  "
              f"min {min(stalls):.2f}  max {max(stalls):.2f}")  # fmt: skip
    if {"failover", "same-node"} <= results.keys():
        ratio = statistics.median(results["failover"]) / statistics.median(results["same-node"])
        print(f"  failover / same-node: {ratio:.2f}x")


if __name__ == "__main__":
    main()
