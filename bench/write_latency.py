"""One client's write latency, by how idle the servers were before the write.

    uv run python bench/write_latency.py [--sessions 20] [--gap-ms 20]

streamboot acknowledges a write once the cache service holds it (so it survives the stream
node's death); nbdkit's cow filter writes to its own overlay file, in its own process. The
difference is one NATS request/reply to a process that may have been asleep. Each session
(one after another on the same server, the first two dropped as warm-up) connects, reads
100 reads of 64 KiB, then:

- ``first``: its first write, right after the reads (the boot trace's lone write is this),
- ``spaced``: a write after ``--gap-ms`` of idleness,
- ``back-to-back``: a write sent as soon as the previous write was answered,
- ``fua``: a write with FUA (the cache service fsyncs before answering),
- ``flush``: a FLUSH.

Reported: median and p90 in ms per case and server, and streamboot's median over
nbdkit-cow's.

``--storm N``: N sessions at once, each (after its reads) commits like a journaling file
system ``--commits`` times: a 4 KiB write, then a FLUSH. Reported per server: write and
flush latency p50/p99 and the sessions' completion p99. Every session's flush needs an
fsync of its own write cache; what one session's fsync holds up of the others shows here.

Both servers run on a sparse 64 MiB image in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bootstorm import Rig, embedded_nats, server_under_test  # noqa: E402
from shared import nbd_wire as W  # noqa: E402
from streamboot.block_replay import NbdExport, nbd_open, percentile  # noqa: E402

SIZE = 64 << 20
BLOCK = 4096
READS = 100
WARMUP_SESSIONS = 2
# (case, NBD command, flags); None = wait --gap-ms.
PLAN: list[tuple[str, int, int] | None] = [
    ("first", W.CMD_WRITE, 0),
    None,
    ("spaced", W.CMD_WRITE, 0),
    ("back-to-back", W.CMD_WRITE, 0),
    None,
    ("fua", W.CMD_WRITE, W.CMD_FLAG_FUA),
    ("flush", W.CMD_FLUSH, 0),
]
SERVERS = ("streamboot", "nbdkit-cow")


class Client:
    """Queue depth 1 over one NBD connection; each request's reply time in ms."""

    def __init__(self, export: NbdExport) -> None:
        self.r, self.w = export.reader, export.writer
        self.handle = 0
        self.payload = b"\xa5" * BLOCK

    async def request(self, cmd: int, flags: int, offset: int, length: int) -> float:
        self.handle += 1
        t0 = time.perf_counter()
        self.w.write(W.REQUEST.pack(W.REQUEST_MAGIC, flags, cmd, self.handle, offset, length))
        if cmd == W.CMD_WRITE:
            self.w.write(self.payload[:length])
        magic, err, handle = W.SIMPLE_REPLY.unpack(await self.r.readexactly(W.SIMPLE_REPLY.size))
        if magic != W.SIMPLE_REPLY_MAGIC or handle != self.handle or err:
            raise ConnectionError(f"command {cmd} at {offset}: error {err} (magic {magic:#x})")
        if cmd == W.CMD_READ:
            await self.r.readexactly(length)
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.w.write(W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_DISC, 0, 0, 0))
        self.w.close()


async def one_session(port: int, token: str, gap_s: float) -> dict[str, float]:
    client = Client(await nbd_open("127.0.0.1", port, token))
    try:
        for i in range(READS):
            await client.request(W.CMD_READ, 0, i * 65536 % (SIZE // 2), 65536)
        out: dict[str, float] = {}
        offset = SIZE // 2  # past the reads; every write a fresh block
        for step in PLAN:
            if step is None:
                await asyncio.sleep(gap_s)
                continue
            case, cmd, flags = step
            length = BLOCK if cmd == W.CMD_WRITE else 0
            out[case] = await client.request(cmd, flags, offset if length else 0, length)
            offset += 1 << 20
        return out
    finally:
        client.close()


async def committing_session(port: int, token: str, commits: int) -> dict[str, list[float]]:
    """Reads, then ``commits`` times a 4 KiB write and a FLUSH; latencies and the whole session (ms)."""
    t0 = time.perf_counter()
    client = Client(await nbd_open("127.0.0.1", port, token))
    out: dict[str, list[float]] = {"write": [], "flush": []}
    try:
        for i in range(READS):
            await client.request(W.CMD_READ, 0, i * 65536 % (SIZE // 2), 65536)
        for i in range(commits):
            out["write"].append(await client.request(W.CMD_WRITE, 0, SIZE // 2 + i * BLOCK, BLOCK))
            out["flush"].append(await client.request(W.CMD_FLUSH, 0, 0, 0))
    finally:
        client.close()
    out["session"] = [(time.perf_counter() - t0) * 1000]
    return out


def run_server(
    server: str, rig: Rig, sessions: int, gap_s: float, storm: int, commits: int
) -> dict[str, list[float]]:
    """Each case's latencies (ms): over the sessions after the warm-up ones, or (``storm``)
    over every request of the ``storm`` concurrent sessions."""
    import uvloop

    n = storm or sessions + WARMUP_SESSIONS
    tokens = [f"wl-{server}-{time.time_ns()}-{i}" for i in range(n)]
    with server_under_test(server, rig, tokens) as under:
        port, announce = under.port, under.announce

        async def one_by_one() -> list[dict[str, float]]:
            out = []
            for token in tokens:
                if announce is not None:
                    await announce([token])
                out.append(await one_session(port, token, gap_s))
            return out

        async def at_once() -> list[dict[str, list[float]]]:
            if announce is not None:
                await announce(tokens)
            return await asyncio.gather(*(committing_session(port, t, commits) for t in tokens))

        if storm:
            runs = uvloop.run(at_once())
            return {case: [x for r in runs for x in r[case]] for case in runs[0]}
        got = uvloop.run(one_by_one())[WARMUP_SESSIONS:]
    return {case: [g[case] for g in got] for case in got[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--storm", type=int, default=0, help="N sessions at once, committing")
    ap.add_argument("--commits", type=int, default=20, help="write+FLUSH per storm session")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamboot-wl-") as tmp:
        work = Path(tmp)
        with open(work / "sparse.img", "wb") as f:
            f.truncate(SIZE)
        with embedded_nats(work) as (nats_url, nats_pid):
            rig = Rig(work / "sparse.img", work, nats_url, nats_pid)
            res = {
                s: run_server(s, rig, args.sessions, args.gap_ms / 1000, args.storm, args.commits)
                for s in SERVERS
            }
    if args.storm:
        print(f"{args.storm} sessions at once, {args.commits} x (write, FLUSH) each; ms")
        tail = 99
    else:
        print(f"{args.sessions} sessions one by one, gap {args.gap_ms:g} ms; ms")
        tail = 90
    head = " ".join(f"{s + ' p50':>15} {f'p{tail}':>6}" for s in SERVERS)
    print(f"{'case':<13} {head}  ratio p50")
    for case in res[SERVERS[0]]:
        cols = " ".join(
            f"{statistics.median(res[s][case]):>15.3f} {percentile(res[s][case], tail):>6.3f}"
            for s in SERVERS
        )
        ratio = statistics.median(res[SERVERS[0]][case]) / statistics.median(res[SERVERS[1]][case])
        print(f"{case:<13} {cols}  {ratio:8.1f}x")


if __name__ == "__main__":
    main()
