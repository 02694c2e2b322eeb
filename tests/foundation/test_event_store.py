"""The event store against a real PostgreSQL: concurrency, idempotence, order, replay."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import orjson
import pytest

from shared.envelope import Envelope
from shared.event_store import ConcurrencyError, EventStore, fetch_for_replay


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


async def test_retry_after_the_stream_moved_on_is_a_noop(store: EventStore) -> None:
    [first] = await store.append([ev("retry-3", n=0)], expected_version=0)
    await store.append([ev("retry-3", n=1)], expected_version=1)
    # The lost reply's retry: its expectation no longer holds, its event is stored.
    [again] = await store.append([first], expected_version=0)
    assert (again.id, again.position, again.version) == (first.id, first.position, 1)
    with pytest.raises(ConcurrencyError):
        await store.append([ev("retry-3", n=2)], expected_version=0)
    # A retry that reached the COPY (no expectation) rolled back; the next append goes on.
    await store.append([first])
    [later] = await store.append([ev("retry-3", n=3)])
    assert later.version == 3 and later.position > first.position
    assert [r.data["n"] for r in await store.read_all()] == [0, 1, 3]


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


async def test_deferred_appends_are_written_at_the_commit_in_order(store: EventStore) -> None:
    """Small batches deferred in one transaction (a group commit) get their positions at
    once, their versions at the commit, and land exactly as appended one by one would;
    an ordinary append between them, and an append after, keep the global order."""
    await store.append([ev("dev-1", n=0), ev("dev-1", n=1)])
    async with store.transaction() as tx:
        a = await tx.append([ev("dev-1", n=2), ev("sess-1", n=0)], defer=True)
        b = await tx.append([ev("dev-1", n=3)], defer=True)
        assert [e.position for e in a + b] == list(range(a[0].position, a[0].position + 3))
        assert await tx.stream_version("dev-1") == 2  # not written yet
        c = await tx.append([ev("sess-2", n=0)])  # written at once, after those
        d = await tx.append([ev("sess-1", n=1)], defer=True)
        with pytest.raises(ValueError):
            await tx.append([ev("x")], expected_version=0, defer=True)
    assert [e.version for e in a + b + c + d] == [3, 1, 4, 1, 2]
    after = await store.append([ev("dev-1", n=4)])
    stored = await store.read_all()
    assert [e.position for e in stored] == sorted(e.position for e in stored)
    assert [(e.stream_id, e.version, e.data["n"]) for e in stored] == [
        ("dev-1", 1, 0), ("dev-1", 2, 1), ("dev-1", 3, 2), ("sess-1", 1, 0), ("dev-1", 4, 3),
        ("sess-2", 1, 0), ("sess-1", 2, 1), ("dev-1", 5, 4),
    ]  # fmt: skip
    assert [e.position for e in stored[2:]] == [e.position for e in a + b + c + d + after]


async def test_deferred_appends_of_a_failed_transaction_leave_nothing(
    store: EventStore,
) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.append([ev("gone-1", n=0)], defer=True)
            raise RuntimeError("the decision failed")
    await store.append([ev("gone-1", n=1)])
    assert [(e.stream_id, e.version, e.data["n"]) for e in await store.read_all()] == [
        ("gone-1", 1, 1)
    ]


async def test_every_field_is_stored_as_given(store: EventStore) -> None:
    """The appended rows are encoded by the store itself (binary COPY): each field type."""
    paris = timezone(timedelta(hours=2))
    events = [
        Envelope(
            type="Ünïcode",
            stream_id="device-52:54:00:00:00:01",
            time=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=paris),
            correlation_id="s-1",
            causation_id="c-ü",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            data={"mac": "52:54:00:00:00:01", "n": [1, 2.5, None, True], "s": 'é\n\t"\\'},
        ),
        Envelope(
            type="Old",
            stream_id="old-1",
            time=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            data={"mac": 7},  # not a string: no mac
        ),
        Envelope(type="Naive", stream_id="old-1", time=datetime(2024, 1, 1, 12, 0)),
    ]
    stored = await store.append(events)
    rows = await store.read_all()
    assert len(rows) == 3
    for e, row in zip(events, rows, strict=True):
        assert (row.id, row.type, row.stream_id, row.version, row.position) == (
            e.id, e.type, e.stream_id, e.version, e.position
        )  # fmt: skip
        assert (row.correlation_id, row.causation_id, row.traceparent) == (
            e.correlation_id, e.causation_id, e.traceparent
        )  # fmt: skip
        assert row.data == e.data
    assert rows[0].time == events[0].time and rows[1].time == events[1].time
    assert rows[2].time == events[2].time.astimezone(UTC)  # a naive time is local time
    assert [s.version for s in stored] == [1, 1, 2]
    assert [r.stream_id for r in await store.read_all(mac="52:54:00:00:00:01")] == [
        "device-52:54:00:00:00:01"
    ]
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE mac IS NOT NULL") == 1


async def test_a_big_batch_is_sent_in_chunks(store: EventStore) -> None:
    batch = [ev(f"big-{i % 7}", i=i) for i in range(1234)]
    await store.append(batch)
    rows = await store.read_all(0, 2000)
    assert [r.data["i"] for r in rows] == list(range(1234))
    assert [r.id for r in rows] == [e.id for e in batch]


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


# The schema of version 1, as it was made (jsonb data, an expression index on data->>'mac').
SCHEMA_V1 = """
CREATE TABLE schema_info (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE events (
    position bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    stream_id text NOT NULL,
    version integer NOT NULL,
    type text NOT NULL,
    time timestamptz NOT NULL,
    correlation_id text,
    causation_id text,
    traceparent text,
    data jsonb NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE INDEX events_type_position ON events (type, position);
CREATE INDEX events_correlation ON events (correlation_id, position)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX events_mac ON events ((data->>'mac'), position) WHERE data ? 'mac';
CREATE TABLE cursors (name text PRIMARY KEY, position bigint NOT NULL);
INSERT INTO schema_info VALUES ('version', '1');
"""


# Version 2, as it was made (json data, the MAC as a column, a type index).
SCHEMA_V2 = """
CREATE TABLE schema_info (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE events (
    position bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    stream_id text NOT NULL,
    version integer NOT NULL,
    type text NOT NULL,
    time timestamptz NOT NULL,
    correlation_id text,
    causation_id text,
    traceparent text,
    data json NOT NULL,
    mac text,
    UNIQUE (stream_id, version)
);
CREATE INDEX events_type ON events (type);
CREATE INDEX events_mac ON events (mac, position) WHERE mac IS NOT NULL;
CREATE TABLE cursors (name text PRIMARY KEY, position bigint NOT NULL);
INSERT INTO schema_info VALUES ('version', '2');
"""

# Three events of one device, as each older version stored them.
OLD_EVENTS = (
    "INSERT INTO events (id, stream_id, version, type, time, correlation_id, data) "
    "VALUES (gen_random_uuid(), 'device-m1', 1, 'DeviceRegistered', now(), NULL, "
    """'{"mac": "52:54:00:00:00:01", "hostname": "h"}'), """
    "(gen_random_uuid(), 'session-s1', 1, 'SessionOpened', now(), 's1', "
    """'{"session_id": "s1", "mac": "52:54:00:00:00:01", "n": [1, 2.5]}'), """
    "(gen_random_uuid(), 'session-s1', 2, 'SessionClosed', now(), 's1', "
    """'{"session_id": "s1"}')"""
)


@pytest.mark.parametrize(
    "schema, fill_mac",
    [(SCHEMA_V1, ""), (SCHEMA_V2, "UPDATE events SET mac = data->>'mac'")],
    ids=["version-1", "version-2"],
)
async def test_an_older_log_is_upgraded(database_url: str, schema: str, fill_mac: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(schema)
        await conn.execute(OLD_EVENTS)
        if fill_mac:  # version 2's appender set the column
            await conn.execute(fill_mac)
        await conn.execute("INSERT INTO cursors VALUES ('relay', 2)")
    finally:
        await conn.close()

    store = await EventStore.connect(database_url)
    try:
        assert await store.pool.fetchval("SELECT value FROM schema_info") == "3"
        rows = await store.read_all()
        assert [(r.position, r.type) for r in rows] == [
            (1, "DeviceRegistered"),
            (2, "SessionOpened"),
            (3, "SessionClosed"),
        ]
        assert rows[1].data == {"session_id": "s1", "mac": "52:54:00:00:00:01", "n": [1, 2.5]}
        assert [r.position for r in await store.read_all(mac="52:54:00:00:00:01")] == [1, 2]
        assert [r.position for r in await store.read_all(types=["SessionClosed"])] == [3]
        assert await store.get_cursor("relay") == 2
        assert await store.pool.fetchval("SELECT pg_typeof(data)::text FROM events LIMIT 1") == (
            "text"
        )
        indexes = {r[0] for r in await store.pool.fetch("SELECT indexname FROM pg_indexes")}
        assert "events_mac" in indexes
        assert not {"events_correlation", "events_type_position", "events_type"} & indexes
        [appended] = await store.append([ev("session-s1", session_id="s1")], expected_version=2)
        assert (appended.position, appended.version) == (4, 3)
        async with store.pool.acquire() as conn:
            replayed = await fetch_for_replay(conn, 0, 10)
        assert orjson.loads(replayed[1]["data"]) == rows[1].data
    finally:
        await store.close()
    # A second start finds version 3 and changes nothing.
    again = await EventStore.connect(database_url)
    assert len(await again.read_all()) == 4
    await again.close()
