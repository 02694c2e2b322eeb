"""The relay from the event log to JetStream: the log is the outbox.

Every event reaches JetStream because the relay publishes the log in position order from a
durable cursor, and advances the cursor only after JetStream acknowledged the batch. A crash
after publishing but before moving the cursor re-publishes the same events with the same
``Nats-Msg-Id`` (the event id), which JetStream drops as duplicates; a crash before
publishing just publishes later. Nothing is published that is not in the log, because the
relay reads only committed rows. Several relays may run (one per registry replica): a
session-level advisory lock lets exactly one of them work at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os

import asyncpg
from nats.js import JetStreamContext

from shared.event_store import EventStore, StoredEvent, unreachable

log = logging.getLogger("streamboot.relay")

CURSOR = "jetstream-relay"
RELAY_LOCK_KEY = 0x5EB0_0702
BATCH = 512
# While batches follow each other, the cursor is written at most this often.
CURSOR_SAVE_S = 0.5


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: STREAMBOOT_FAULT=<name> kills the process here."""
    if os.environ.get("STREAMBOOT_FAULT") == name:
        log.error("fault injection: dying at %s", name)
        os._exit(137)


def headers_for(event: StoredEvent) -> dict[str, str]:
    headers = {
        "Nats-Msg-Id": str(event.id),
        "Streamboot-Position": str(event.position),
        "Streamboot-Stream": event.stream_id,
    }
    if event.traceparent:
        headers["traceparent"] = event.traceparent
    return headers


def subject_for(event: StoredEvent) -> str:
    kind = event.stream_id.split("-", 1)[0] or "misc"
    return f"events.{event.type}.{kind}"


class EventRelay:
    def __init__(self, store: EventStore, js: JetStreamContext) -> None:
        self._store = store
        self._js = js
        self._wake = asyncio.Event()
        self.published = 0
        # The cursor as this relay has published, while it holds the relay lock (nobody
        # else moves it then): not read back before each batch. Written to the log at most
        # every CURSOR_SAVE_S while batches follow each other, and once they stop.
        self._cursor: int | None = None
        self._saved: int | None = None
        self._saved_at = 0.0

    def poke(self) -> None:
        """Something was appended: publish it now rather than at the next poll."""
        self._wake.set()

    async def run(self, poll_s: float = 0.5) -> None:
        """Publish forever; only the holder of the relay lock works, others wait their turn.
        PostgreSQL going away ends the lock's session: the relay stops publishing, takes
        the lock again once PostgreSQL is back, and carries on from the durable cursor."""
        loop = asyncio.get_running_loop()
        away_since: float | None = None
        while True:
            try:
                async with self._store.session() as lock_conn:
                    if away_since is not None:
                        log.warning(
                            "relay: PostgreSQL answers again after %.1f s; taking the relay lock",
                            loop.time() - away_since,
                        )
                        away_since = None
                    await self._hold_lock(lock_conn, poll_s)
                    self._cursor = self._saved = None
                    try:
                        await self._publish_while_locked(lock_conn, poll_s)
                    finally:
                        if not lock_conn.is_closed():
                            await lock_conn.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                if away_since is None:  # one line per outage, and one when it ends
                    away_since = loop.time()
                    log.warning("relay: PostgreSQL away (%s); publishing stopped", exc)
                await asyncio.sleep(poll_s)

    async def _hold_lock(self, lock_conn: asyncpg.Connection, poll_s: float) -> None:
        # Polling a database lock: there is no event to wait on.
        while not await lock_conn.fetchval(  # noqa: ASYNC110
            "SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY
        ):
            await asyncio.sleep(poll_s)

    async def _publish_while_locked(self, lock_conn: asyncpg.Connection, poll_s: float) -> None:
        while True:
            if lock_conn.is_closed():  # the lock went with its session
                raise ConnectionResetError("the relay lock's connection closed")
            self._wake.clear()
            try:
                moved = await self.publish_pending()
            except Exception as exc:
                # NATS or Postgres away: nothing is lost, the cursor did not move.
                self._cursor = self._saved = None
                log.warning("relay: publishing paused (%s); retrying", exc)
                await asyncio.sleep(poll_s)
                continue
            if moved:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), poll_s)
            except TimeoutError:
                pass

    async def publish_pending(self) -> int:
        """Publish one batch after the cursor; returns how many events it published."""
        cursor = self._cursor
        if cursor is None:
            cursor = self._saved = await self._store.get_cursor(CURSOR)
        events = await self._store.read_all(cursor, BATCH)
        if not events:
            self._cursor = cursor
            await self._save_cursor(quiet=True)
            return 0
        acks = await asyncio.gather(
            *(
                self._js.publish(
                    subject_for(e),
                    e.envelope().model_dump_json(exclude={"position"}).encode(),
                    headers=headers_for(e),
                )
                for e in events
            )
        )
        _crash_point("relay.after_publish")
        self._cursor = events[-1].position
        await self._save_cursor(quiet=False)
        self.published += sum(1 for a in acks if not a.duplicate)
        return len(events)

    async def _save_cursor(self, *, quiet: bool) -> None:
        """Write the cursor if it moved: at once when the log is quiet, else at most every
        CURSOR_SAVE_S (a storm's groups would each cost a write). Not waiting for the disk
        either: a cursor behind in a crash re-publishes events that JetStream drops as
        duplicates (module docstring)."""
        if self._cursor is None or self._cursor == self._saved:
            return
        now = asyncio.get_running_loop().time()
        if quiet or now - self._saved_at >= CURSOR_SAVE_S:
            await self._store.set_cursor(CURSOR, self._cursor, durable=False)
            self._saved, self._saved_at = self._cursor, now
