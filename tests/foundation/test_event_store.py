"""The event store against a real PostgreSQL: concurrency, idempotence, order, replay."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from shared.envelope import Envelope
from shared.event_store import ConcurrencyError, EventStore


def ev(stream: str, **data: object) -> Envelope:
    return Envelope(type="TestHappened", stream_id=stream, data=dict(data))


@pytest.fixture
async def store(database_url: str):
    s = await EventStore.connect(database_url)
    yield s
    await s.close()


async def test_concurrent_appends_to_one_stream_exactly_one_wins(store: EventStore) -> None:
    await store.append([ev("order-1", n=0)], expected_version=0)

    async def contender(i: int) -> str:
        try:
            await store.append([ev("order-1", n=i)], expected_version=1)
            return "won"
        except ConcurrencyError as exc:
            assert exc.stream_id == "order-1" and exc.expected == 1 and exc.actual == 2
            assert "is at version 2" in str(exc)
            return "conflict"

    results = await asyncio.gather(*(contender(i) for i in range(10)))
    assert Counter(results) == {"won": 1, "conflict": 9}
    assert [e.version for e in await store.read_stream("order-1")] == [1, 2]


async def test_new_stream_expectation(store: EventStore) -> None:
    await store.append([ev("s-1")], expected_version=0)
    with pytest.raises(ConcurrencyError):
        await store.append([ev("s-1")], expected_version=0)


async def test_retried_append_is_a_noop(store: EventStore) -> None:
    batch = [ev("retry-1", n=i) for i in range(3)]
    first = await store.append(batch)
    again = await store.append(batch)
    assert [(e.id, e.position, e.version) for e in again] == [
        (e.id, e.position, e.version) for e in first
    ]
    assert len(await store.read_stream("retry-1")) == 3
    assert await store.last_position() == first[-1].position


async def test_partial_retry_is_refused(store: EventStore) -> None:
    batch = [ev("retry-2", n=i) for i in range(2)]
    await store.append(batch[:1])
    with pytest.raises(Exception, match="already stored"):
        await store.append(batch)
    assert len(await store.read_stream("retry-2")) == 1


async def test_global_order_under_concurrency(store: EventStore) -> None:
    async def writer(w: int) -> None:
        for i in range(20):
            await store.append([ev(f"w-{w}", i=i), ev(f"w-{w}", i=i, second=True)])

    await asyncio.gather(*(writer(w) for w in range(8)))
    rows = await store.read_all(0, 100_000)
    positions = [r.position for r in rows]
    # Gapless and ordered: what a cursor-based reader relies on.
    assert positions == list(range(positions[0], positions[0] + 320))
    for w in range(8):
        stream = [r for r in rows if r.stream_id == f"w-{w}"]
        assert [r.version for r in stream] == list(range(1, 41))
        assert [r.data["i"] for r in stream] == [i for i in range(20) for _ in (0, 1)]


async def test_filters_and_batches(store: EventStore) -> None:
    await store.append(
        [Envelope(type="A", stream_id="f-1", data={"mac": "52:54:00:00:00:01"})]
        + [Envelope(type="B", stream_id="f-2", data={"x": i}) for i in range(5)]
    )
    assert [r.type for r in await store.read_all(types=["A"])] == ["A"]
    assert len(await store.read_all(stream_id="f-2")) == 5
    assert [r.stream_id for r in await store.read_all(mac="52:54:00:00:00:01")] == ["f-1"]
    assert len([r async for r in store.iterate_all(0, batch=2)]) == 6


def count_by_stream(projection: Counter[str], stream_id: str) -> None:
    projection[stream_id] += 1


async def test_live_projection_equals_rebuild(store: EventStore) -> None:
    live: Counter[str] = Counter()
    got_all = asyncio.Event()
    total = 60

    async def follower() -> None:
        async for row in store.follow(0, poll_s=5):
            count_by_stream(live, row.stream_id)
            if sum(live.values()) == total:
                got_all.set()

    task = asyncio.create_task(follower())
    try:
        for i in range(total // 3):
            await store.append([ev(f"p-{i % 4}"), ev(f"p-{i % 5}"), ev("p-x")])
        # NOTIFY wakes the follower; the 5 s poll would be too slow for this timeout.
        await asyncio.wait_for(got_all.wait(), 4)
    finally:
        task.cancel()
    rebuilt: Counter[str] = Counter()
    async for row in store.iterate_all():
        count_by_stream(rebuilt, row.stream_id)
    assert rebuilt == live
    assert sum(rebuilt.values()) == total


async def test_schema_version_mismatch_is_refused(store: EventStore, database_url: str) -> None:
    await store.pool.execute("UPDATE schema_info SET value = '99' WHERE key = 'version'")
    with pytest.raises(Exception, match="schema version 99"):
        await EventStore.connect(database_url)
