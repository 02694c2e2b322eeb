"""The event log on PostgreSQL (asyncpg): append, read a stream, read all, follow.

Design (see docs/architecture.md):
- One table ``events``; ``position`` is the global order, ``(stream_id, version)`` is unique and
  gives optimistic concurrency, ``id`` is unique and makes a retried append a no-op.
- Appends take one transaction-scoped advisory lock. Positions therefore become visible in
  order, with no gaps that a reader could skip, which keeps catch-up readers and the JetStream
  relay simple (a cursor on ``position`` is enough). The price is one append transaction at a
  time; batches keep that well above what the control plane needs (bench/eventlog.py).
- Each append NOTIFYs ``streamboot_events`` so followers wake without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from shared.envelope import Envelope

log = logging.getLogger("streamboot.event_store")

SCHEMA_VERSION = 3
NOTIFY_CHANNEL = "streamboot_events"
# Any 64-bit constant: the lock every append transaction holds.
APPEND_LOCK_KEY = 0x5EB0_0701

SCHEMA_INFO = "CREATE TABLE IF NOT EXISTS schema_info (key text PRIMARY KEY, value text NOT NULL)"

# Every index here is read by a query of this module (the rest of the code reads through
# it), and paid by every append: position (order, cursors), id (idempotency), (stream_id,
# version) (concurrency, read_stream), (mac, position) (read_all's mac filter: a device's
# timeline). The type filter (`events list --type`) has no index: it walks the log in
# order (60 ms for a rare type in a million events), where the index cost a tenth of each
# append's server time.
SCHEMA = """
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
    -- The event's JSON text as the store encoded it (orjson), sent back as stored. Not
    -- json: its input function parsed every event again on append (a tenth of the
    -- server's time); nor jsonb (a third). Ad-hoc SQL says data::jsonb->>'field'.
    data text NOT NULL,
    -- The data's "mac" (device-related events), set by the appender: what a device's
    -- timeline is looked up by.
    mac text,
    UNIQUE (stream_id, version)
);
CREATE INDEX events_mac ON events (mac, position) WHERE mac IS NOT NULL;
CREATE TABLE cursors (name text PRIMARY KEY, position bigint NOT NULL);
"""

# Each upgrade from the version before: applied in order, all in one transaction.
MIGRATIONS = {
    # 1 -> 2: data jsonb -> json, the MAC as a column instead of an expression index, the
    # type index without the position, no index on correlation_id (nothing queried it).
    2: """
DROP INDEX IF EXISTS events_correlation;
DROP INDEX IF EXISTS events_type_position;
ALTER TABLE events ADD COLUMN mac text;
UPDATE events SET mac = data->>'mac' WHERE data ? 'mac';
DROP INDEX IF EXISTS events_mac;
ALTER TABLE events ALTER COLUMN data TYPE json USING data::json;
CREATE INDEX events_type ON events (type);
CREATE INDEX events_mac ON events (mac, position) WHERE mac IS NOT NULL;
""",
    # 2 -> 3: data json -> text, no type index. One rewrite of the table.
    3: """
DROP INDEX IF EXISTS events_type;
ALTER TABLE events ALTER COLUMN data TYPE text;
""",
}

ANY_VERSION: None = None
NO_STREAM = 0


class EventStoreError(Exception):
    pass


class ConcurrencyError(EventStoreError):
    """The stream moved on since the caller read it: re-read and decide again."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, the append expected {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class SchemaMismatchError(EventStoreError):
    pass


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL cannot be reached right now (stopped, restarting,
    the connection lost): the same statement may succeed later."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.OperatorInterventionError
        # A pooled connection left mid-operation by the server's loss ("cannot switch to
        # state ..., another operation is in progress"); the pool replaces it.
        | asyncpg.InternalClientError,
    ):
        return True
    # asyncpg's "cannot perform operation: connection is closed"
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


class _OutageWithoutTraceback(logging.Filter):
    """asyncpg's pool logs each failed reconnect while PostgreSQL is away with a traceback;
    the message and the error say it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and unreachable(exc):
            said = str(exc).replace("\n", " ").replace("%", "%%")  # msg is a %-format
            record.msg = f"{record.msg} ({said})"
            record.exc_info = None
        return True


logging.getLogger("asyncpg.pool").addFilter(_OutageWithoutTraceback())


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A row as read back: light enough for replaying millions (no validation)."""

    position: int
    id: uuid.UUID
    stream_id: str
    version: int
    type: str
    time: Any
    correlation_id: str | None
    causation_id: str | None
    traceparent: str | None
    data: dict[str, Any]

    def envelope(self) -> Envelope:
        return Envelope.model_construct(
            id=self.id,
            type=self.type,
            stream_id=self.stream_id,
            version=self.version,
            time=self.time,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            traceparent=self.traceparent,
            data=self.data,
            position=self.position,
        )


_COLUMNS = (
    "position, id, stream_id, version, type, time, correlation_id, causation_id, traceparent, data"
)


# The columns an append writes, in the order _copy_rows encodes them.
_INSERT_COLUMNS = [
    "position",
    "id",
    "stream_id",
    "version",
    "type",
    "time",
    "correlation_id",
    "causation_id",
    "traceparent",
    "data",
    "mac",
]


def _row(record: asyncpg.Record) -> StoredEvent:
    *envelope, data = record
    return StoredEvent(*envelope, orjson.loads(data))


# What a projection needs of each event, and no more: replay reads millions of rows. The
# data comes as its JSON text, for the projection to decode only where it needs it; the
# time as epoch seconds (a float costs a fraction of a datetime to make).
REPLAY_COLUMNS = "position, type, data, date_part('epoch', time), stream_id"


async def fetch_for_replay(
    conn: asyncpg.Connection, after_position: int, limit: int
) -> list[asyncpg.Record]:
    """One batch of (position, type, data as JSON text, time as epoch seconds, stream id)
    records after a position, in order."""
    return await conn.fetch(
        f"SELECT {REPLAY_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2",
        after_position,
        limit,
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a replay builds up a read model: every
    decoded row allocates, and the collector would otherwise rescan the growing model again
    and again (measured: it cut replay to a quarter). Event data holds no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_BEGIN_AND_LOCK = f"BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing. The pool's connections keep no session state
    (LISTEN and session locks go to EventStore.session; no cursors or SETs; asyncpg still
    rolls back an open transaction), so asyncpg's default reset query was a round trip per
    append for nothing."""


class EventStore:
    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 8) -> EventStore:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            # Every statement planned for its arguments and the log's current size. asyncpg
            # prepares statements, and PostgreSQL then switches to a generic plan, made once
            # and kept: one made while the log was small (a sequential scan for the append's
            # id check) was kept as it grew, until autovacuum's next ANALYZE happened to
            # invalidate it, and meanwhile every append read the whole log (measured: 0.1 s,
            # then over 1 s per batch of 1,000 at 140,000 events); and a generic plan cannot
            # tell `position > (the end of the log)` from `position > 0`. Planning costs
            # a fraction of a millisecond per statement.
            server_settings={"plan_cache_mode": "force_custom_plan"},
            reset=_keep_session,
        )
        store = cls(pool, dsn)
        await store.migrate()
        return store

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @asynccontextmanager
    async def session(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own, closed afterwards, for session state (LISTEN, session
        advisory locks) that must not go back to the pool, which does not reset it."""
        conn = await asyncpg.connect(self._dsn)
        try:
            yield conn
        finally:
            await conn.close()

    async def migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Serialise concurrent first starts of several services (and keep writers out
            # while an older log is upgraded).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
            await conn.execute(SCHEMA_INFO)
            found = await conn.fetchval("SELECT value FROM schema_info WHERE key = 'version'")
            if found is None:
                await conn.execute(SCHEMA)
                await conn.execute(
                    "INSERT INTO schema_info VALUES ('version', $1)", str(SCHEMA_VERSION)
                )
            elif found.isdigit() and int(found) < SCHEMA_VERSION:
                # One transaction: a crash or an error leaves the older log as it was.
                count = await conn.fetchval("SELECT count(*) FROM events")
                log.warning(
                    "event log: upgrading %d events from schema version %s to %d "
                    "(a rewrite of the table)",
                    count,
                    found,
                    SCHEMA_VERSION,
                )
                for version in range(int(found) + 1, SCHEMA_VERSION + 1):
                    await conn.execute(MIGRATIONS[version])
                await conn.execute(
                    "UPDATE schema_info SET value = $1 WHERE key = 'version'", str(SCHEMA_VERSION)
                )
            elif found != str(SCHEMA_VERSION):
                raise SchemaMismatchError(
                    f"the event log has schema version {found}; this streamboot reads "
                    f"version {SCHEMA_VERSION} (and upgrades older ones). Refusing to touch it."
                )

    # --- appending ------------------------------------------------------------------------

    async def append(
        self,
        events: Sequence[Envelope],
        *,
        expected_version: int | None = ANY_VERSION,
        expected: Mapping[str, int] | None = None,
    ) -> list[Envelope]:
        """Append events atomically; returns them with version and position filled in (on
        the given envelopes themselves).

        Versions are assigned per stream in order, after the stream's current version.
        ``expected_version`` (single-stream batches) or ``expected`` (per stream) enforce
        optimistic concurrency: 0 means "the stream must not exist yet".
        An append whose event ids are all already stored is a no-op that returns the stored
        events, so a retry after a lost reply never duplicates.
        """
        if not events:
            return []
        try:
            async with self.transaction() as tx:
                # Optimistic: no lookup of the batch's ids first (a thousand index probes per
                # batch); a retried batch fails on the unique id instead, and is rolled back.
                return await tx.append(
                    events, expected_version=expected_version, expected=expected, retry=False
                )
        except asyncpg.UniqueViolationError:
            pass
        # A retry (or a partial one), told apart from new events by a lookup of their ids.
        # The rolled-back COPY drew positions from the sequence: a hole, which readers that
        # keep "the last position I saw" do not mind (nothing can commit into it).
        async with self.transaction() as tx:
            return await tx.append(events, expected_version=expected_version, expected=expected)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction holding the append lock: read, decide and append with no other writer
        in between (the registry uses this to enforce uniqueness rules across its replicas).
        Each append in it NOTIFYs followers, which PostgreSQL delivers at the commit."""
        async with self._pool.acquire() as conn:
            # BEGIN and the lock in one round trip (simple query protocol). The lock is its
            # own statement all the same: a statement's snapshot is taken before it runs, so
            # reads in the same statement as the lock could miss a commit made while it
            # waited; each statement of the message gets its own.
            await conn.execute(_BEGIN_AND_LOCK)
            try:
                tx = Transaction(conn)
                yield tx
                await tx.flush()
            except BaseException:
                # If the connection is gone, the server rolls back (and asyncpg has detached
                # it from the pool: even is_closed() raises); the original error goes up.
                with contextlib.suppress(
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                    asyncpg.PostgresConnectionError,
                    OSError,
                ):
                    if not conn.is_closed():
                        await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    # --- reading --------------------------------------------------------------------------

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[StoredEvent]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version",
            stream_id,
            after_version,
        )
        return [_row(r) for r in rows]

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = 10_000,
        *,
        types: Sequence[str] | None = None,
        stream_id: str | None = None,
        mac: str | None = None,
    ) -> list[StoredEvent]:
        """Events in global order after a position, optionally filtered (each filter indexed)."""
        where = ["position > $1"]
        args: list[Any] = [after_position]
        if types:
            args.append(list(types))
            where.append(f"type = ANY(${len(args)})")
        if stream_id:
            args.append(stream_id)
            where.append(f"stream_id = ${len(args)}")
        if mac:
            args.append(mac)
            where.append(f"mac = ${len(args)}")
        args.append(limit)
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} "
            f"ORDER BY position LIMIT ${len(args)}",
            *args,
        )
        return [_row(r) for r in rows]

    async def read_latest(
        self, limit: int, *, types: Sequence[str] | None = None
    ) -> list[StoredEvent]:
        """The last ``limit`` events (of these types), in global order: the log read
        backwards from its end, for "what happened lately"."""
        args: list[Any] = [limit]
        where = ""
        if types:
            args.append(list(types))
            where = "WHERE type = ANY($2) "
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM events {where}ORDER BY position DESC LIMIT $1", *args
        )
        return [_row(r) for r in reversed(rows)]

    async def session_opened(self, token_hash: str) -> StoredEvent | None:
        """The SessionOpened of the session whose token has this SHA-256 (the log keeps
        only the hash), through the index on the events' type."""
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM events WHERE type = 'SessionOpened' "
            "AND data::jsonb->>'token_hash' = $1 ORDER BY position DESC LIMIT 1",
            token_hash,
        )
        return _row(row) if row else None

    async def read_device(
        self,
        mac: str,
        after_position: int = 0,
        limit: int = 100_000,
        *,
        types: Sequence[str] | None = None,
    ) -> list[StoredEvent]:
        """A device's events and its sessions' own (attached, detached, closed name the
        session, not the MAC), in global order; indexed reads only."""
        own = await self.read_all(0, limit, mac=mac)
        rows = {e.position: e for e in own if e.position > after_position}
        for sid in dict.fromkeys(e.data["session_id"] for e in own if e.type == "SessionOpened"):
            for e in await self.read_stream(f"session-{sid}"):
                if e.position > after_position:
                    rows[e.position] = e
        picked = [rows[p] for p in sorted(rows) if not types or rows[p].type in types]
        return picked[:limit]

    async def iterate_all(
        self, after_position: int = 0, batch: int = 50_000
    ) -> AsyncIterator[StoredEvent]:
        """Everything from a position to the current end, streamed in batches (for replay)."""
        position = after_position
        while True:
            rows = await self.read_all(position, batch)
            for row in rows:
                yield row
            if len(rows) < batch:
                return
            position = rows[-1].position

    async def ids_at(self, positions: Sequence[int]) -> dict[int, str]:
        """The ids of the events at these positions (those that exist)."""
        rows = await self._pool.fetch(
            "SELECT position, id FROM events WHERE position = ANY($1::bigint[])", list(positions)
        )
        return {r["position"]: str(r["id"]) for r in rows}

    async def last_position(self) -> int:
        return await self._pool.fetchval("SELECT coalesce(max(position), 0) FROM events")

    async def follow(
        self,
        after_position: int = 0,
        *,
        poll_s: float = 1.0,
        seen: Callable[[], int] | None = None,
        **filters: Any,
    ) -> AsyncIterator[StoredEvent]:
        """Catch up from a position, then yield new events as they are appended, forever.

        Wakes on NOTIFY; polls as a fallback so a missed notification only delays.
        ``seen``: the position up to which the caller has the events by other means (its
        own appends): those are not read again, and a NOTIFY naming a position at or
        before it (each append names its last) wakes no read."""
        wake = asyncio.Event()
        named = 0  # the highest position a NOTIFY named

        def on_notify(_conn: object, _pid: object, _channel: object, payload: str) -> None:
            nonlocal named
            # An empty or foreign payload: read to find out.
            named = max(named, int(payload) if payload.isdigit() else 1 << 62)
            wake.set()

        async with self.session() as listener:
            await listener.add_listener(NOTIFY_CHANNEL, on_notify)
            position = after_position
            read = True
            while True:
                wake.clear()
                if seen is not None:
                    position = max(position, seen())
                if read or named > position:
                    rows = await self.read_all(position, 1000, **filters)
                    for row in rows:
                        position = row.position
                        yield row
                    if len(rows) == 1000:
                        continue
                try:
                    await asyncio.wait_for(wake.wait(), poll_s)
                    read = False
                except TimeoutError:
                    read = True

    # --- cursors (for the relay and other durable readers) -----------------------------

    async def get_cursor(self, name: str) -> int:
        value = await self._pool.fetchval("SELECT position FROM cursors WHERE name = $1", name)
        return int(value or 0)

    async def set_cursor(self, name: str, position: int, *, durable: bool = True) -> None:
        """``durable=False``: the commit does not wait for the disk, for a cursor whose
        loss in a crash only repeats work that is safe to repeat (the relay's: JetStream
        drops the re-published events by their ids)."""
        await self._pool.execute(_SET_CURSOR if durable else _SET_CURSOR_LAZILY, name, position)


_SET_CURSOR = (
    "INSERT INTO cursors VALUES ($1, $2) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)
_SET_CURSOR_LAZILY = (
    "WITH lazy AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)) "
    "INSERT INTO cursors SELECT $1, $2 FROM lazy "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)


class Transaction:
    """Appends inside one locked transaction (see :meth:`EventStore.transaction`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.last_position: int | None = None
        # Deferred appends (append(defer=True)): the events, and the next position to give.
        self._deferred: list[Envelope] = []
        self._next_position: int | None = None

    async def stream_version(self, stream_id: str) -> int:
        return await self.conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id
        )

    async def append(
        self,
        events: Sequence[Envelope],
        *,
        expected_version: int | None = ANY_VERSION,
        expected: Mapping[str, int] | None = None,
        retry: bool | None = None,
        defer: bool = False,
    ) -> list[Envelope]:
        """Append in this transaction (see :meth:`EventStore.append`). ``retry=False``
        skips looking the batch's ids up first: a batch that is in fact a retry then fails
        on the unique id, which aborts the transaction (:meth:`EventStore.append` starts
        another). By default the ids are looked up.

        ``defer=True``: new events (fresh ids, any stream version) get their positions at
        once and are written with every other deferred batch of the transaction by one
        COPY before its commit (:meth:`flush`), their versions filled in then. Many small
        batches in one transaction (a group commit of session opens) then cost two round
        trips in all instead of two each."""
        if not events:
            return []
        if defer:
            return await self._defer(events, expected_version, expected)
        await self.flush()  # in position order: what was deferred goes first
        self._next_position = None  # positions drawn below come after any reserved
        conn = self.conn
        streams = list(dict.fromkeys(e.stream_id for e in events))
        expectations = dict(expected or {})
        if expected_version is not None:
            if len(streams) != 1:
                raise ValueError("expected_version needs a single-stream batch; use expected=")
            expectations[streams[0]] = expected_version
        ids = [e.id for e in events]
        # One round trip: each stream's version, how many of the ids are stored already,
        # and the batch's positions, drawn from the sequence at once (under the append lock
        # no other session draws from it, so they are the next ones in commit order, and
        # the COPY does not call nextval per row: 4% of its time). A batch that turns out
        # to be refused or a retry leaves a hole in positions, which readers that keep
        # "the last position I saw" do not mind. With the NOTIFY: followers only wake on it
        # (they read from their own position), and it is delivered at the commit, so never
        # before the events are visible (nor at all if the transaction fails).
        if retry is False:
            check = await conn.fetchrow(_CHECK_AND_RESERVE, streams, len(events), NOTIFY_CHANNEL)
        else:
            check = await conn.fetchrow(
                _CHECK_IDS_AND_RESERVE, streams, len(events), NOTIFY_CHANNEL, ids
            )
        versions_now, stored, last = check
        if stored:
            return await self._already_stored(ids, stored)
        current = {s: v for s, v in zip(streams, versions_now, strict=True) if v is not None}
        for stream, want in expectations.items():
            have = current.get(stream, 0)
            if have != want:
                if retry is False and (stored := await self._count_stored(ids)):
                    # A retry of a batch that was appended: its streams have moved on.
                    return await self._already_stored(ids, stored)
                raise ConcurrencyError(stream, want, have)
        versions = _versions(events, current)
        first = last - len(events) + 1
        # COPY is about twice as fast as INSERT for batches.
        await conn.copy_to_table(
            "events",
            source=_copy_data(events, versions, first),
            columns=_INSERT_COLUMNS,
            format="binary",
        )
        self.last_position = last
        # The appended envelopes get their version and position filled in, in place: a
        # pydantic copy per event was half the cost of a 1,000-event append.
        for p, (e, v) in enumerate(zip(events, versions, strict=True), first):
            e.__dict__["version"] = v
            e.__dict__["position"] = p
        return list(events)

    async def _defer(
        self,
        events: Sequence[Envelope],
        expected_version: int | None,
        expected: Mapping[str, int] | None,
    ) -> list[Envelope]:
        if expected_version is not None or expected:
            raise ValueError("a deferred append takes any stream version")
        if self._next_position is None:
            # Under the append lock nobody else draws positions: the next ones after this
            # are ours, and flush() moves the sequence past the last one given.
            self._next_position = await self.conn.fetchval(_NEXT_POSITION)
        for p, e in enumerate(events, self._next_position):
            e.__dict__["position"] = p
        self._next_position += len(events)
        self._deferred.extend(events)
        return list(events)

    async def read_and_reserve(self, after_position: int, limit: int) -> list[asyncpg.Record]:
        """The events after ``after_position`` (:func:`fetch_for_replay`'s records, at most
        ``limit``) and the first position of this transaction's deferred appends, in one
        round trip: a group commit's catch-up and its reservation together."""
        rows = await self.conn.fetch(_READ_AND_RESERVE, after_position, limit)
        self._next_position = rows[0][0]
        return [tuple(r)[1:] for r in rows if r[1] is not None]

    async def flush(self) -> None:
        """Write the deferred events in one round trip: the streams' versions read, the
        rows inserted, the sequence moved past them and the NOTIFY, by one statement."""
        events, self._deferred = self._deferred, []
        if not events:
            return
        last = events[-1].__dict__["position"]
        self._next_position = None
        columns: tuple[list[Any], ...] = tuple([] for _ in range(10))
        (positions, ids, streams, types, times, correlations, causations, traceparents,
         datas, macs) = columns  # fmt: skip
        for e in events:
            f = e.__dict__
            data = f["data"]
            mac = data.get("mac")
            positions.append(f["position"])
            ids.append(f["id"])
            streams.append(f["stream_id"])
            types.append(f["type"])
            times.append(f["time"])
            correlations.append(f["correlation_id"])
            causations.append(f["causation_id"])
            traceparents.append(f["traceparent"])
            datas.append(orjson.dumps(data).decode())
            macs.append(mac if isinstance(mac, str) else None)
        rows = await self.conn.fetch(_INSERT_DEFERRED, *columns, last, NOTIFY_CHANNEL)
        version_at = dict(rows)
        self.last_position = last
        for e in events:
            e.__dict__["version"] = version_at[e.__dict__["position"]]

    async def _count_stored(self, ids: list[uuid.UUID]) -> int:
        return await self.conn.fetchval(_COUNT_STORED, ids)

    async def _already_stored(self, ids: list[uuid.UUID], found: int) -> list[Envelope]:
        """A retried batch: every id stored already, else the batch is refused."""
        if found != len(set(ids)):
            raise EventStoreError(
                f"{found} of {len(ids)} events of this batch are already stored: "
                "a retry must resend the same batch"
            )
        existing = await self.conn.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE id = ANY($1::uuid[]) ORDER BY position", ids
        )
        return [_row(r).envelope() for r in existing]


# The streams' versions in the order given: one index probe per stream (a GROUP BY would
# scan every row of each stream).
_STREAM_VERSIONS = """ARRAY(
    SELECT (SELECT max(version) FROM events WHERE stream_id = s.s)
    FROM unnest($1::text[]) WITH ORDINALITY AS s(s, n) ORDER BY s.n
)"""
# Draws $2 positions; NOTIFYs channel $3 with the last of them (see _INSERT_DEFERRED).
_RESERVE_POSITIONS = """(SELECT last FROM (SELECT last, pg_notify($3, last::text) FROM (
    SELECT setval(seq, nextval(seq) + $2 - 1) AS last
    FROM (SELECT pg_get_serial_sequence('events', 'position')::regclass AS seq) AS s) AS m) AS l)"""
_CHECK_AND_RESERVE = f"SELECT {_STREAM_VERSIONS}, 0, {_RESERVE_POSITIONS}"
_CHECK_IDS_AND_RESERVE = (
    f"SELECT {_STREAM_VERSIONS}, "
    "(SELECT count(*)::int FROM events WHERE id = ANY($4::uuid[])), "
    f"{_RESERVE_POSITIONS}"
)
_COUNT_STORED = "SELECT count(*)::int FROM events WHERE id = ANY($1::uuid[])"
_SEQUENCE = "pg_get_serial_sequence('events', 'position')::regclass"
_NEXT_POSITION = f"SELECT nextval({_SEQUENCE})"
# A position drawn, then the events after $1 (at most $2) as replay records; one row with
# no event when there are none. The draw and the read see the same log: the transaction
# holds the append lock, and only its holder draws positions.
_READ_AND_RESERVE = f"""
WITH n AS MATERIALIZED (SELECT nextval({_SEQUENCE}) AS next)
SELECT n.next, e.* FROM n LEFT JOIN LATERAL (
    SELECT {REPLAY_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2
) AS e ON true ORDER BY 2"""
# The deferred events ($1-$10: a column each, in position order) inserted with their
# versions (after their stream's current one, in order); the sequence set to the last
# position ($11) and NOTIFY $12 with it as the payload (a follower that has applied that
# position has nothing to read). Returns (position, version) per event.
_INSERT_DEFERRED = f"""
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[],
        $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
        WITH ORDINALITY AS r(position, id, stream_id, type, time, correlation_id,
            causation_id, traceparent, data, mac, n)
), base AS (
    SELECT s.stream_id,
        coalesce((SELECT max(version) FROM events WHERE stream_id = s.stream_id), 0) AS v
    FROM (SELECT DISTINCT stream_id FROM r) AS s
), moved AS MATERIALIZED (
    SELECT setval({_SEQUENCE}, $11), pg_notify($12, $11::text)
)
INSERT INTO events ({", ".join(_INSERT_COLUMNS)})
SELECT r.position, r.id, r.stream_id,
    base.v + row_number() OVER (PARTITION BY r.stream_id ORDER BY r.n),
    r.type, r.time, r.correlation_id, r.causation_id, r.traceparent, r.data, r.mac
FROM r JOIN base USING (stream_id) CROSS JOIN moved
ORDER BY r.n
RETURNING position, version"""


def _versions(events: Sequence[Envelope], current: Mapping[str, int]) -> list[int]:
    """Each event's version: after its stream's current one, in order."""
    next_version = dict(current)
    versions = []
    for e in events:
        stream = e.__dict__["stream_id"]
        v = next_version.get(stream, 0) + 1
        next_version[stream] = v
        versions.append(v)
    return versions


# --- the appended rows, in PostgreSQL's binary COPY format ------------------------------
# Encoded here rather than by asyncpg's copy_records_to_table so that they go out in
# chunks: PostgreSQL inserts the first rows while the next ones are encoded, where asyncpg
# encodes all of a batch (up to 512 KB) before it sends any (measured: 12% more events/s
# in batches of 1,000). The fields are read from the envelopes' __dict__: pydantic's
# BaseModel defines __getattr__, which slows every attribute read.
#
# The row: field count, then per column of _INSERT_COLUMNS its length (-1: NULL) and
# bytes. int8: 8 bytes; uuid: 16; int4: 4; text: UTF-8 (asyncpg's client_encoding);
# timestamptz: microseconds since 2000-01-01 UTC in 8 bytes. All big-endian.

_COPY_CHUNK_ROWS = 100
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension
_COPY_TRAILER = b"\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_int32 = struct.Struct("!i").pack
_NULL = _int32(-1)
_ROW_START = struct.Struct("!hiqi16si").pack  # field count; position; id; stream id's length
_VERSION = struct.Struct("!iii").pack  # version; the type's length
_TIME = struct.Struct("!iq").pack


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    b = value.encode()
    return _int32(len(b)) + b


def _copy_rows(events: Sequence[Envelope], versions: Sequence[int], first: int) -> bytes:
    rows = []
    for position, (e, version) in enumerate(zip(events, versions, strict=True), first):
        f = e.__dict__
        stream = f["stream_id"].encode()
        type_ = f["type"].encode()
        when = f["time"]
        if when.tzinfo is None:  # local time, as asyncpg reads a naive datetime
            when = when.astimezone(UTC)
        t = when - _PG_EPOCH
        data = f["data"]
        json = orjson.dumps(data)
        mac = data.get("mac")
        rows.append(
            b"".join(
                (
                    _ROW_START(len(_INSERT_COLUMNS), 8, position, 16, f["id"].bytes, len(stream)),
                    stream,
                    _VERSION(4, version, len(type_)),
                    type_,
                    _TIME(8, (t.days * 86_400 + t.seconds) * 1_000_000 + t.microseconds),
                    _text(f["correlation_id"]),
                    _text(f["causation_id"]),
                    _text(f["traceparent"]),
                    _int32(len(json)),
                    json,
                    _text(mac if isinstance(mac, str) else None),
                )
            )
        )
    return b"".join(rows)


async def _copy_data(
    events: Sequence[Envelope], versions: Sequence[int], first: int
) -> AsyncIterator[bytes]:
    """The COPY's data, a chunk of rows at a time (asyncpg sends each as it comes)."""
    yield _COPY_HEADER
    for start in range(0, len(events), _COPY_CHUNK_ROWS):
        end = start + _COPY_CHUNK_ROWS
        yield _copy_rows(events[start:end], versions[start:end], first + start)
    yield _COPY_TRAILER
