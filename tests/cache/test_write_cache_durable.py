"""FLUSH and FUA on the cache service's write caches: one fsync at a time per cache, shared
by the requests that come while it runs, and never in the way of another cache's writes.

In process, on real files; the write subject's test goes through a real nats-server. Each
cache's ``sync`` is wrapped so a test can hold an
fsync at its start (a threading.Event: the fsync runs in a worker thread) and count them;
the wrapped call is the real one."""

from __future__ import annotations

import asyncio
import errno
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from services.cache.write_batches import WriteBatches
from services.cache.write_cache import FSYNC_LATENCY, SessionWriteCache, WriteCaches
from shared.contracts.cache import wire
from tests.cache.test_write_cache_files import caches, open_request, write
from tests.conftest import wait_for

# The cache node process answering (first in every write reply).
INCARNATION = b"process1"


def flush() -> tuple[int, int, int, int, None]:
    return (wire.OP_FLUSH, wire.FLAG_SYNC, 0, 0, None)


def fua_write(offset: int, data: bytes) -> tuple[int, int, int, int, memoryview]:
    return (wire.OP_WRITE, wire.FLAG_SYNC, offset, len(data), memoryview(data))


class HeldSync:
    """Counts a cache's fsyncs; while ``hold`` is clear each one waits at its start."""

    def __init__(self, wc: SessionWriteCache) -> None:
        self.real = wc.sync
        self.hold = threading.Event()
        self.hold.set()
        self.started = 0
        self.fail: OSError | None = None
        wc.sync = self  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.started += 1
        assert self.hold.wait(10), "the test never released the fsync"
        if self.fail is not None:
            raise self.fail
        self.real()


@pytest.fixture
def wcs(tmp_path: Path) -> Iterator[WriteCaches]:
    w = caches(tmp_path, [])
    w.recover()
    yield w
    w.close()


def opened(wcs: WriteCaches, key: str) -> tuple[SessionWriteCache, HeldSync]:
    wc = wcs.open(open_request(key))
    return wc, HeldSync(wc)


async def flush_held(
    wcs: WriteCaches, wc: SessionWriteCache, sync: HeldSync, data: bytes
) -> asyncio.Task[bytes]:
    """A write and a FLUSH to ``wc`` whose fsync is held at its start: the pending answer."""
    sync.hold.clear()
    statuses, to_sync = wcs.apply_now(wc.key, [write(0, data), flush()])
    assert to_sync is wc
    answer = asyncio.create_task(wcs.when_durable(wc, statuses))
    await wait_for(lambda: sync.started == 1, f"{wc.key}'s fsync to start")
    return answer


async def test_a_flush_with_nothing_new_since_the_last_fsync_costs_none(
    wcs: WriteCaches,
) -> None:
    _wc, sync = opened(wcs, "a")
    timed = sum(FSYNC_LATENCY.counts)
    assert await wcs.apply("a", [fua_write(0, b"x" * 4096)]) == b"\0"
    assert sync.started == 1
    assert sum(FSYNC_LATENCY.counts) == timed + 1  # the fsync's latency, for Prometheus
    assert await wcs.apply("a", [flush()]) == b"\0"
    assert sync.started == 1  # the FUA write's fsync already covered it
    assert sum(FSYNC_LATENCY.counts) == timed + 1
    assert await wcs.apply("a", [write(4096, b"y" * 4096), flush()]) == b"\0\0"
    assert sync.started == 2


async def test_flushes_during_an_fsync_share_the_next_one(wcs: WriteCaches) -> None:
    wc, sync = opened(wcs, "a")
    first = await flush_held(wcs, wc, sync, b"1" * 4096)

    # Written while that fsync runs: it may not cover them, so their flushes wait for
    # another one, which all three share.
    later = []
    for i in range(1, 4):
        statuses, _ = wcs.apply_now("a", [write(i * 4096, bytes([i]) * 4096), flush()])
        later.append(asyncio.create_task(wcs.when_durable(wc, statuses)))
    await asyncio.sleep(0.05)
    assert not first.done() and not any(t.done() for t in later)

    sync.hold.set()
    assert await first == b"\0\0"
    assert await asyncio.gather(*later) == [b"\0\0"] * 3
    assert sync.started == 2
    assert wc.synced == wc.changes


async def test_one_caches_fsync_holds_up_no_other_cache(wcs: WriteCaches) -> None:
    a, a_sync = opened(wcs, "a")
    b, b_sync = opened(wcs, "b")
    a_flush = await flush_held(wcs, a, a_sync, b"a" * 4096)

    # b writes and flushes while a's fsync is held.
    assert wcs.apply_now("b", [write(0, b"b" * 4096)]) == (b"\0", None)
    assert await asyncio.wait_for(wcs.apply("b", [flush()]), 5) == b"\0"
    assert b_sync.started == 1 and b.synced == b.changes
    assert not a_flush.done()

    a_sync.hold.set()
    assert await a_flush == b"\0\0"


async def test_a_failed_fsync_fails_every_flush_waiting_on_it(wcs: WriteCaches) -> None:
    wc, sync = opened(wcs, "a")
    sync.fail = OSError(errno.EIO, "disk gone")
    first = await flush_held(wcs, wc, sync, b"1" * 4096)
    s2, _ = wcs.apply_now("a", [flush()])  # nothing new: it waits on the same fsync
    second = asyncio.create_task(wcs.when_durable(wc, s2))
    await asyncio.sleep(0.05)
    sync.hold.set()
    assert await first == bytes([errno.EIO]) * 2
    assert await second == bytes([errno.EIO])
    assert sync.started == 1
    assert wc.synced < wc.changes  # nothing counted as durable

    # The next flush tries again, and succeeds once the disk is back.
    sync.fail = None
    assert await wcs.apply("a", [flush()]) == b"\0"
    assert sync.started == 2 and wc.synced == wc.changes


def batch(key: str, *records: tuple[int, int, int, int, memoryview | None]) -> bytes:
    """A batch as the stream's WriteChannel sends it."""
    parts = [wire.batch_prefix(key)]
    for op, flags, offset, length, data in records:
        parts.append(wire.RECORD.pack(op, flags, offset, length))
        if data is not None:
            parts.append(bytes(data))
    return b"".join(parts)


async def test_the_write_subject_answers_other_sessions_during_an_fsync(
    wcs: WriteCaches, nats_url: str
) -> None:
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    subject = f"test.wc.write.{uuid.uuid4().hex}"
    a, a_sync = opened(wcs, "a")
    opened(wcs, "b")
    a_sync.hold.clear()
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(subject, cb=WriteBatches(wcs, spawn, INCARNATION).on_batch)
        a_commit = asyncio.create_task(
            nc.request(subject, batch("a", write(0, b"a" * 4096), flush()), timeout=10)
        )
        await wait_for(lambda: a_sync.started == 1, "a's fsync to start")

        # Sent after a's FLUSH, on the same subscription: answered while a's fsync waits.
        b_write = await nc.request(subject, batch("b", write(0, b"b" * 4096)), timeout=5)
        assert b_write.data == INCARNATION + b"\0"
        b_commit = await nc.request(subject, batch("b", fua_write(4096, b"c" * 4096)), timeout=5)
        assert b_commit.data == INCARNATION + b"\0"
        a_more = await nc.request(subject, batch("a", write(8192, b"d" * 4096)), timeout=5)
        assert (
            a_more.data == INCARNATION + b"\0"
        )  # a's own next write does not wait for its fsync either
        assert not a_commit.done()

        a_sync.hold.set()
        assert (await a_commit).data == INCARNATION + b"\0\0"
        assert a.read(0, 4096) == b"a" * 4096 and a.read(8192, 4096) == b"d" * 4096

        bad = await nc.request(subject, b"\xff", timeout=5)
        assert b"invalid" in bad.data
    finally:
        a_sync.hold.set()
        await nc.close()
