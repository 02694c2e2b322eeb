"""Scale-out with real engines: two stream nodes and two cache nodes, each its own process
in its own network namespace, and N sessions placed across them (issue 28). Run as root:

    uv run python bench/scaleout.py [--sessions 1000] [--concurrency 100] [--json out.json]

The registry, PostgreSQL and NATS run in the host namespace (bench/session_opens.py's rig:
one vdisk, N known devices in a collection it is assigned to); NATS listens on a bridge
that joins four namespaces, one per node, each with its own address on it. Every node is
``python -m services.stream`` or ``python -m services.cache`` as a deployment runs it, with
its own node id, data dir and (stream) advertised address. N sessions are opened through
NATS as booting clients' opens are (``--concurrency`` at a time); each is placed on a stream
node by the registry, announced to it, and the node opens its write cache on the cache
node it is placed on. Then a real NBD client (nbdinfo) reads a session's export on each
stream node across the bridge.

Reported per node: the sessions placed on it (the open answers), what it holds (stream:
the open sessions its heartbeat shows; cache: its write caches, ``wc.list``), its resident memory,
and the opens' rate and errors. No peer: what this shows is the spread, not a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.session_opens import Rig, mac_of, seed  # noqa: E402
from shared import bus  # noqa: E402
from shared.contracts.cache.client import all_write_caches  # noqa: E402
from shared.heartbeat import HeartbeatView  # noqa: E402

BRIDGE_IP = "10.78.0.1"
NODES = (("stream", "stream-a"), ("stream", "stream-b"), ("cache", "cache-a"), ("cache", "cache-b"))
NBD_PORT, HTTP_PORT = 10809, 18081


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Node:
    service: str
    node_id: str
    netns: str
    address: str
    process: subprocess.Popen[bytes] | None = None


class Network:
    """A bridge in the host namespace and a namespace per node on it (veth pairs)."""

    def __init__(self, tag: str) -> None:
        self.bridge = f"sbo{tag}"
        self.nodes = [
            Node(service, node_id, f"sbo{tag}-{node_id}", f"10.78.0.{11 + i}")
            for i, (service, node_id) in enumerate(NODES)
        ]

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, n in enumerate(self.nodes):
            host_if, node_if = f"{self.bridge}h{i}", "eth0"
            sh("ip", "netns", "add", n.netns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if,
               "netns", n.netns)  # fmt: skip
            sh("ip", "link", "set", host_if, "master", self.bridge)
            sh("ip", "link", "set", host_if, "up")
            ns = ("ip", "netns", "exec", n.netns)
            sh(*ns, "ip", "addr", "add", f"{n.address}/24", "dev", node_if)
            sh(*ns, "ip", "link", "set", node_if, "up")
            sh(*ns, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        for n in self.nodes:
            subprocess.run(["ip", "netns", "del", n.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def start_node(n: Node, rig: Rig, work: Path) -> None:
    data = work / n.node_id
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")} | {
        "STREAMBOOT_NATS_URL": f"nats://{BRIDGE_IP}:{rig.nats.port}",
        "STREAMBOOT_NODE_ID": n.node_id,
        "STREAMBOOT_DATA_DIR": str(data),
        "STREAMBOOT_VDISK_DIR": str(rig.data / "vdisks"),
        "STREAMBOOT_BIND_HOST": n.address,
        "STREAMBOOT_PUBLIC_HOST": n.address,
        "STREAMBOOT_METRICS_PORT": "0",
        "STREAMBOOT_LOG_LEVEL": "WARNING",
        "STREAMBOOT_CACHE_RAM_DIR": str(data / "shm"),
    }
    if n.service == "stream":
        env |= {"STREAMBOOT_NBD_PORT": str(NBD_PORT), "STREAMBOOT_HTTP_STREAM_PORT": str(HTTP_PORT)}
    with open(work / f"{n.node_id}.log", "wb") as log:
        n.process = subprocess.Popen(
            ["ip", "netns", "exec", n.netns, sys.executable, "-m", f"services.{n.service}"],
            env=env, cwd=ROOT, stderr=log, stdout=subprocess.DEVNULL,
        )  # fmt: skip


async def wait_alive(view: HeartbeatView, nodes: list[Node], timeout_s: float = 120) -> None:
    want = {n.node_id for n in nodes}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            alive = {b["node"] for b in view.read_now() if b.get("alive")}
        except Exception:
            alive = set()
        if want <= alive:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not heartbeating after {timeout_s}s: {sorted(want - alive)}")


def rss_mib(pid: int) -> float:
    """Resident memory of the service under ``ip netns exec`` (which execs it: same pid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def nbd_size(uri: str) -> str:
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else f"failed: {r.stderr.strip()[:200]}"


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    net = Network(str(os.getpid() % 100000))
    rig = Rig(work, nats_host="0.0.0.0")  # the nodes reach it over the bridge
    macs = [mac_of(i) for i in range(args.sessions)]
    try:
        net.up()
        await rig.start()
        await seed(rig, macs)
        for n in net.nodes:
            start_node(n, rig, work)
        nc = await bus.connect(rig.nats.url, "bench-scaleout")
        view = HeartbeatView(nc.jetstream(), 10.0)
        watching = asyncio.create_task(view.run())
        await wait_alive(view, net.nodes)
        await asyncio.sleep(3)  # the registry's own view has them too (its watch)

        gate = asyncio.Semaphore(args.concurrency)
        answers: list[dict[str, Any]] = []
        errors: list[str] = []

        async def open_one(mac: str) -> None:
            async with gate:
                try:
                    answers.append(await bus.request_json(
                        nc, "streamboot.registry.session.open", {"mac": mac}, timeout_s=120))  # fmt: skip
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(open_one(m) for m in macs))
        wall = time.perf_counter() - t0
        placed = Counter(a["stream_node"] for a in answers)

        # The announced sessions attach on their nodes, each opening its write cache.
        caches: list[dict[str, Any]] = []
        for _ in range(240):
            caches, _complete = await all_write_caches(nc, timeout_s=5.0)
            if len(caches) >= len(answers):
                break
            await asyncio.sleep(1.0)
        held = Counter(c.get("node") for c in caches)
        await asyncio.sleep(6)  # a heartbeat of each stream node since they attached
        beats = {b["node"]: b for b in view.read_now() if b.get("alive")}
        reads = {}
        for node in ("stream-a", "stream-b"):
            a = next((a for a in answers if a["stream_node"] == node), None)
            reads[node] = nbd_size(a["nbd_uri"]) if a else "no session"
        rows = []
        for n in net.nodes:
            assert n.process is not None
            rows.append({
                "node": n.node_id, "service": n.service, "netns": n.netns, "address": n.address,
                "sessions_placed": placed.get(n.node_id, 0) if n.service == "stream" else None,
                "sessions_held": beats.get(n.node_id, {}).get("sessions")
                if n.service == "stream" else None,
                "write_caches": held.get(n.node_id, 0) if n.service == "cache" else None,
                "nbdinfo_size": reads.get(n.node_id),
                "rss_mib": round(rss_mib(n.process.pid), 1),
            })  # fmt: skip
        watching.cancel()
        await nc.close()
        return {
            "sessions": args.sessions, "opened": len(answers), "errors": len(errors),
            "first_error": errors[0] if errors else "", "opens_s": round(len(answers) / wall, 1),
            "write_caches": len(caches), "nodes": rows,
        }  # fmt: skip
    finally:
        for n in net.nodes:
            if n.process is not None and n.process.poll() is None:
                n.process.terminate()
                try:
                    n.process.wait(30)
                except subprocess.TimeoutExpired:
                    n.process.kill()
        await rig.stop()
        net.down()


def report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['opened']} of {r['sessions']} sessions opened ({r['errors']} errors, "
        f"{r['opens_s']} opens/s), {r['write_caches']} write caches",
        "",
        "| node | netns address | sessions placed | sessions held | write caches | "
        "nbdinfo --size (a session of it) | RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in r["nodes"]:

        def cell(v: Any) -> str:
            return "" if v is None else str(v)

        lines.append(
            f"| {n['node']} | {n['address']} | {cell(n['sessions_placed'])} | "
            f"{cell(n['sessions_held'])} | {cell(n['write_caches'])} | "
            f"{cell(n['nbdinfo_size'])} | {n['rss_mib']} |"
        )
    if r["first_error"]:
        lines.append(f"\nfirst error: {r['first_error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/scaleout.py makes network namespaces: run it as root")
    work = Path(tempfile.mkdtemp(prefix="streamboot-bench-scaleout-"))
    work.chmod(0o711)  # the embedded postgres may run as another user
    try:
        result = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
