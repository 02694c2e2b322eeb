"""What one session costs the servers, by vdisk size: CPU and memory per announced session.

    uv run python bench/session_cost.py [--sizes-gib 0.0625,100,1024] [--sessions 50]
    uv run python bench/session_cost.py --idle 1000,10000     # idle attached sessions

For each size, a sparse raw image of that size in a temp dir, served by the cache service
and one stream node (bench/bootstorm.py's ``Streamboot``) on an embedded NATS. ``--sessions``
sessions are announced (as the registry does when a boot session opens) and attach (write
cache placed, files made, mirror made); then one client per session connects, writes 64 KiB
at each end of the disk and reads it back. Reported: CPU milliseconds and resident MiB per
session in the stream node, the cache service and nats-server while the sessions open, the
same for the clients' writes, and the clients' connect time p50/p99 beside nbdkit's cow
filter on the same image (its overlay is made per connection).

``--idle N,...``: for each N, a fresh cache service + stream node (the demo-sized sparse
image, server-disk write caches), N sessions announced, then N clients that attach (the NBD
handshake with their token) and stay connected, doing nothing. Reported: each process's
resident memory and open file descriptors with the N attached, and per session (the rise
over the processes at rest, divided by N); beside it nbdkit's cow filter holding N idle
connections to the same image (a thread per connection: at most PEER_MAX of them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bootstorm import (  # noqa: E402
    Rig,
    Streamboot,
    embedded_nats,
    run_clients,
    server_under_test,
)
from bench.common import cpu_ms, wait_port  # noqa: E402
from shared.fd_limit import raise_soft_limit  # noqa: E402
from streamboot.block_replay import NbdExport, Request, nbd_open, percentile  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402
from tests.cache.conftest import Proc, rss_mib  # noqa: E402


def measure(pids: dict[str, int], action: object, sessions: int) -> dict[str, tuple[float, float]]:
    """(CPU ms, RSS MiB) per session that each process spent on ``action()``."""
    cpu0 = {k: cpu_ms([p]) for k, p in pids.items()}
    rss0 = {k: rss_mib(p) for k, p in pids.items()}
    action()  # type: ignore[operator]
    time.sleep(1.0)  # the background part (files made after the open's reply...)
    return {
        k: ((cpu_ms([p]) - cpu0[k]) / sessions, (rss_mib(p) - rss0[k]) / sessions)
        for k, p in pids.items()
    }


def client_trace(size: int) -> list[Request]:
    end = size - 65536
    return [
        Request(0, 0, 65536, "w"),
        Request(0, end, 65536, "w"),
        Request(0, 0, 65536, "r"),
        Request(0, end, 65536, "r"),
    ]


def sparse_image(path: Path, size: int) -> Path:
    if not path.exists():
        path.touch()
        os.truncate(path, size)
    return path


def announced_node(
    work: Path, nats_url: str, nats_pid: int, image: Path, tag: str, n: int
) -> tuple[Streamboot, list[str], dict[str, int]]:
    """A fresh cache service + stream node serving ``n`` tokens of ``image`` (announced
    sessions), settled: it, the tokens, and the pids whose cost is measured."""
    sub = work / tag
    sub.mkdir()
    tokens = [f"{tag}-{i}-{time.time_ns()}" for i in range(n)]
    sb = Streamboot(sub, nats_url, image, "local", tokens, None, announced=True)
    time.sleep(1.0)  # started: heartbeats and the like settle
    return sb, tokens, {"stream": sb.node.p.pid, "cache": sb.cache.p.pid, "nats": nats_pid}


def run_size(work: Path, nats_url: str, nats_pid: int, size: int, sessions: int) -> None:
    image = sparse_image(work / f"disk-{size}.raw", size)
    sb, tokens, pids = announced_node(work, nats_url, nats_pid, image, f"cost-{size}", sessions)
    try:
        opened = measure(pids, lambda: asyncio.run(sb.announce(tokens)), sessions)
        results: list[object] = []
        trace = client_trace(size)
        written = measure(
            pids,
            lambda: results.extend(run_clients(sb.port, tokens, trace, False)[0]),
            sessions,
        )
        errors = [r.error for r in results if r.error]  # type: ignore[attr-defined]
        connect = [r.connect_s * 1000 for r in results]  # type: ignore[attr-defined]
    finally:
        sb.stop()
    with server_under_test("nbdkit-cow", Rig(image, work, nats_url, nats_pid), []) as under:
        peer = run_clients(under.port, [f"peer-{i}" for i in range(sessions)], trace, False)[0]
    peer_connect = [r.connect_s * 1000 for r in peer]
    gib = size / (1 << 30)
    for phase, got in (("open", opened), ("write", written)):
        cells = ", ".join(f"{k} {c:6.2f} ms {m:7.3f} MiB" for k, (c, m) in got.items())
        print(f"{gib:8.2f} GiB  {phase:<5} per session: {cells}")
    print(
        f"{gib:8.2f} GiB  connect p50/p99 ms: streamboot {percentile(connect, 50):.2f}/"
        f"{percentile(connect, 99):.2f}, nbdkit-cow {percentile(peer_connect, 50):.2f}/"
        f"{percentile(peer_connect, 99):.2f}; errors: {len(errors)}"
        + (f" ({errors[0]})" if errors else "")
    )


# Clients attach this many at a time (a storm of handshakes is not what is measured here).
ATTACH_BATCH = 250
IDLE_SIZE = 1 << 30
# nbdkit serves each connection with a thread of its own: past about 2,000 here they stop
# attaching, and thousands of threads crowd the machine's task limit for everyone.
PEER_MAX = 1000


def open_fds(pid: int) -> str:
    """How many descriptors the process has open: sockets, and files by folder."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = "socket" if target.startswith("socket:") else os.path.dirname(target)[-24:]
        kinds[kind] = kinds.get(kind, 0) + 1
    top = sorted(kinds.items(), key=lambda x: -x[1])[:3]
    return f"{sum(kinds.values())} fds: " + ", ".join(f"{v} {k}" for k, v in top)


async def attach_idle(port: int, names: list[str]) -> tuple[list[NbdExport], list[str]]:
    """One NBD client per name, each through the handshake and then left connected; the
    ones that could not attach, by their error."""
    held: list[NbdExport] = []
    failed: list[str] = []
    for i in range(0, len(names), ATTACH_BATCH):
        batch = names[i : i + ATTACH_BATCH]
        got = await asyncio.gather(
            *(nbd_open("127.0.0.1", port, n) for n in batch), return_exceptions=True
        )
        for x in got:
            if isinstance(x, NbdExport):
                held.append(x)
            else:
                failed.append(f"{type(x).__name__}: {x}")
    return held, failed


def hold_idle(
    server: str, port: int, names: list[str], pids: dict[str, int]
) -> dict[str, tuple[float, str]]:
    """Attach the clients, let the servers settle, and read (RSS MiB, fds) of each process."""

    async def run() -> dict[str, tuple[float, str]]:
        held, failed = await attach_idle(port, names)
        if failed:
            print(f"  {server}: {len(failed)} of {len(names)} clients did not attach: {failed[0]}")
        try:
            await asyncio.sleep(3.0)  # attach events, write caches placed, allocator settles
            return {k: (rss_mib(p), open_fds(p)) for k, p in pids.items()}
        finally:
            for x in held:
                x.writer.close()

    import uvloop

    return uvloop.run(run())


IDLE_ROWS: list[dict[str, object]] = []  # what --json writes


def idle_row(name: str, n: int, rest: dict[str, float], held: dict[str, tuple[float, str]]) -> str:
    for k, (mib, fds) in held.items():
        kib = (mib - rest[k]) * 1024 / n
        IDLE_ROWS.append({"server": name, "process": k, "sessions": n, "rss_mib": mib,
                          "kib_per_session": kib, "fds": fds})  # fmt: skip
    cells = ", ".join(
        f"{k} {mib:7.1f} MiB ({(mib - rest[k]) * 1024 / n:6.1f} KiB/session; {fds})"
        for k, (mib, fds) in held.items()
    )
    return f"{name:<10} {n:>6} idle attached: {cells}"


def run_idle(work: Path, nats_url: str, nats_pid: int, n: int) -> list[str]:
    image = sparse_image(work / "idle.raw", IDLE_SIZE)
    sb, tokens, pids = announced_node(work, nats_url, nats_pid, image, f"idle-{n}", n)
    try:
        rest = {k: rss_mib(p) for k, p in pids.items()}
        asyncio.run(sb.announce(tokens))
        held = hold_idle("streamboot", sb.port, tokens, pids)
    finally:
        sb.stop()
    rows = [idle_row("streamboot", n, rest, held)]
    port = free_port()
    args = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=cow", "file", str(image)]
    peer = Proc(args, log=work / f"idle-{n}" / "nbdkit.log")
    try:
        wait_port(port)
        time.sleep(0.5)
        rest = {"nbdkit-cow": rss_mib(peer.p.pid)}
        m = min(n, PEER_MAX)
        held = hold_idle("nbdkit-cow", port, [""] * m, {"nbdkit-cow": peer.p.pid})
    finally:
        peer.stop()
    rows.append(idle_row("nbdkit-cow", m, rest, held))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes-gib", default="0.0625,100,1024")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--idle", help="idle attached sessions instead: counts, e.g. 1000,10000")
    ap.add_argument("--json", type=Path, help="with --idle: also write the rows here")
    args = ap.parse_args()
    soft, _ = raise_soft_limit()  # the clients' sockets, and the servers inherit it
    work = Path(tempfile.mkdtemp(prefix="session-cost-"))
    try:
        with embedded_nats(work) as (nats_url, nats_pid):
            if args.idle:
                print(f"open-file limit {soft}")
                for n in (int(x) for x in args.idle.split(",")):
                    for row in run_idle(work, nats_url, nats_pid, n):
                        print(row, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(IDLE_ROWS, indent=1))
                return
            for gib in (float(x) for x in args.sizes_gib.split(",")):
                run_size(work, nats_url, nats_pid, int(gib * (1 << 30)), args.sessions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
