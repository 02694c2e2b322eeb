"""Event log benchmark: append rate (single events, batches) and replay rate through the
registry's projection, on the embedded PostgreSQL (fsync on, as `streamboot up` runs it).

The peer, in the same run on the same server: plain asyncpg, COPY of 1,000-row batches into
a bare table and an ordered read of it; the ratio says what the event store's envelope,
concurrency checks and indexes cost.

    uv run python bench/eventlog.py [--events 200000] [--single 2000]
    uv run python bench/eventlog.py --live-sessions 100000   # the projection at scale

``--live-sessions N``: N devices, each with a session opened and attached and never closed
(what the registry holds during a storm of N machines), appended in batches; then the
registry's start-up replay into a fresh projection: its time, and the resident memory the
projection took (this process's RSS before and after, after a GC) per live session. The
peer is the same as above (plain asyncpg's ordered read of as many rows).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import uvloop

from services.registry.app import replay
from services.registry.projection import Projection
from shared.envelope import Envelope
from shared.event_store import EventStore
from shared.events import (
    BlocksRequested,
    DeviceRegistered,
    Event,
    SessionAttached,
    SessionClosed,
    SessionDetached,
    SessionOpened,
    envelope,
)
from streamboot.embedded.postgres import EmbeddedPostgres
from streamboot.embedded.proc import free_port
from streamboot.timeline import device_timelines


def mac(i: int) -> str:
    return f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def boot_day(total: int, devices: int = 2000) -> Iterator[Event]:
    """A realistic mix: devices registered once, then boots of 10 events each (open, attach,
    7 batches of block accesses, close) until ``total`` events."""
    n = 0
    for d in range(devices):
        yield DeviceRegistered(mac=mac(d), machine_id=f"m-{d}", hostname=f"lab-{d:04}")
        n += 1
    s = 0
    while n < total:
        d = s % devices
        sid = f"s{s:08}"
        yield SessionOpened(
            session_id=sid,
            mac=mac(d),
            hostname=f"lab-{d:04}",
            machine_id=f"m-{d}",
            vdisk="win11",
            version=1,
            stream_node="node-1",
            write_cache="server-disk",
            write_cache_persistence="discard",
        )
        yield SessionAttached(
            session_id=sid, stream_node="node-1", protocol="nbd", client_addr="10.0.0.1:5000"
        )
        for b in range(6):
            yield BlocksRequested(
                session_id=sid,
                vdisk="win11",
                version=1,
                extents=[(b * 100 + k, k * 65536, 65536, "r") for k in range(8)],
            )
        yield SessionDetached(
            session_id=sid,
            stream_node="node-1",
            protocol="nbd",
            client_addr="10.0.0.1:5000",
            bytes_read=1 << 24,
            bytes_written=1 << 20,
        )
        yield SessionClosed(session_id=sid, reason="shutdown")
        n += 10
        s += 1


def live_sessions(n: int) -> Iterator[Event]:
    """``n`` devices, each with one session opened and attached, none closed."""
    for d in range(n):
        yield DeviceRegistered(mac=mac(d), machine_id=f"m-{d:08}", hostname=f"lab-{d:07}")
    for d in range(n):
        sid = f"s{d:08}"
        yield SessionOpened(
            session_id=sid, mac=mac(d), hostname=f"lab-{d:07}", machine_id=f"m-{d:08}",
            vdisk="win11", version=1, stream_node=f"node-{d % 4}",
            write_cache="server-disk", write_cache_persistence="discard",
        )  # fmt: skip
        yield SessionAttached(
            session_id=sid, stream_node=f"node-{d % 4}", protocol="nbd",
            client_addr=f"10.{d >> 16 & 255}.{d >> 8 & 255}.{d & 255}:5000",
        )  # fmt: skip


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


async def bench_live(dsn: str, n: int, batch: int) -> dict[str, float]:
    """The projection holding ``n`` live sessions: replay time and memory."""
    store = await EventStore.connect(dsn)
    events = live_sessions(n)
    while chunk := [envelope(e) for e in itertools.islice(events, batch)]:
        await store.append(chunk)
    gc.collect()
    before = rss_mib()
    projection = Projection()
    t = time.perf_counter()
    async with store.pool.acquire() as conn:
        total = await replay(conn, projection)
    seconds = time.perf_counter() - t
    gc.collect()
    grew = rss_mib() - before
    assert len(projection.sessions) == n, "the replay did not rebuild the live sessions"
    await store.close()
    print(
        f"{n:,} live sessions ({total:,} events): replay {seconds:.2f} s "
        f"({total / seconds:,.0f} events/s), projection {grew:.0f} MiB resident "
        f"({grew * 1024 * 1024 / n:,.0f} bytes per live session and its device)"
    )
    return {"replay through the registry projection": total / seconds, "events": total,
            "replay_s": seconds, "projection_mib": grew}  # fmt: skip


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f}/s"


async def bench_store(dsn: str, total: int, single: int, batch: int) -> dict[str, float]:
    store = await EventStore.connect(dsn)
    results: dict[str, float] = {}

    singles = [Envelope(type="Pinged", stream_id=f"ping-{i % 50}") for i in range(single)]
    t = time.perf_counter()
    for e in singles:
        await store.append([e])
    results["append single (sequential)"] = single / (time.perf_counter() - t)

    conc = [Envelope(type="Pinged", stream_id=f"pong-{i % 50}") for i in range(single)]
    t = time.perf_counter()
    await asyncio.gather(*(store.append([e]) for e in conc))
    results["append single (all concurrent)"] = single / (time.perf_counter() - t)

    # Batches are made as they go (as a service makes its events), and only the appends are
    # timed: a million envelopes held at once would measure Python's GC, not the store.
    day, appended, spent = boot_day(total), 0, 0.0
    while chunk := [envelope(e) for e in itertools.islice(day, batch)]:
        t = time.perf_counter()
        await store.append(chunk)
        spent += time.perf_counter() - t
        appended += len(chunk)
    results[f"append batches of {batch}"] = appended / spent

    # The registry's own start-up replay: batches on one connection into its projection.
    projection = Projection()
    t = time.perf_counter()
    async with store.pool.acquire() as conn:
        n = await replay(conn, projection)
    results["replay through the registry projection"] = n / (time.perf_counter() - t)
    assert len(projection.devices) == 2000, "the replay did not rebuild the devices"
    await store.pool.execute("ANALYZE events")
    t = time.perf_counter()
    boots = await device_timelines(store, mac(7))
    timeline_s = time.perf_counter() - t
    assert boots, "device 7 booted in the generated day"
    print(
        f"timeline of one device ({len(boots)} boots) on {n:,} events: {timeline_s * 1000:.0f} ms"
    )
    await store.close()
    return results


async def bench_peer(dsn: str, total: int, batch: int) -> dict[str, float]:
    """Plain asyncpg on a bare table: the ceiling for this server and driver."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE peer (position bigserial PRIMARY KEY, type text, stream_id text, data text)"
    )
    rows = [("T", f"s-{i % 100}", f'{{"i": {i}}}') for i in range(total)]
    t = time.perf_counter()
    for i in range(0, total, batch):
        await conn.copy_records_to_table(
            "peer", records=rows[i : i + batch], columns=["type", "stream_id", "data"]
        )
    results = {f"append batches of {batch}": total / (time.perf_counter() - t)}
    t = time.perf_counter()
    n = 0
    last = 0
    while True:
        got = await conn.fetch(
            "SELECT position, type, stream_id, data FROM peer WHERE position > $1 "
            "ORDER BY position LIMIT 50000",
            last,
        )
        n += len(got)
        if len(got) < 50000:
            break
        last = got[-1][0]
    results["ordered read"] = n / (time.perf_counter() - t)
    await conn.close()
    return results


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="streamboot-bench-"))
    pg = EmbeddedPostgres(root, port=free_port(), password=secrets.token_urlsafe(16))
    await pg.start(log_path=root / "postgres.log")
    try:
        admin = await asyncpg.connect(pg.dsn("postgres"))
        await admin.execute("CREATE DATABASE bench_store")
        await admin.execute("CREATE DATABASE bench_peer")
        await admin.close()
        if args.live_sessions:
            ours = await bench_live(pg.dsn("bench_store"), args.live_sessions, args.batch)
            args.events = int(ours.pop("events"))
            extra = {k: ours.pop(k) for k in ("replay_s", "projection_mib")}
            print(f"(replay {extra['replay_s']:.2f} s, {extra['projection_mib']:.0f} MiB)")
        else:
            ours = await bench_store(pg.dsn("bench_store"), args.events, args.single, args.batch)
        peer = await bench_peer(pg.dsn("bench_peer"), args.events, args.batch)
    finally:
        await pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nevent log, {args.events:,} events, embedded PostgreSQL (fsync on)\n")
    print(f"| {'measure':<42} | {'streamboot':>12} | {'plain asyncpg':>13} | ratio |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 15}|-------|")
    peer_of = {f"append batches of {args.batch}": peer[f"append batches of {args.batch}"]}
    for label, value in ours.items():
        p = peer_of.get(label) or (peer["ordered read"] if label.startswith("replay") else None)
        ratio = f"{value / p:.2f}" if p else "-"
        peer_s = f"{p:>13,.0f}" if p else f"{'-':>13}"
        print(f"| {label:<42} | {value:>12,.0f} | {peer_s} | {ratio:>5} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--single", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--live-sessions", type=int, default=0, help="the projection at scale")
    uvloop.run(main(parser.parse_args()))
