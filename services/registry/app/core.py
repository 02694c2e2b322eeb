"""How every command of the registry's application layer runs, and the projection it
decides on.

Every command runs the same way (:meth:`CommandCore._execute`): take the process lock and the
event store's global append lock (one transaction), catch the projection up with the log on
that same connection, ask the domain for the events, append them, commit, then apply them.
Holding the append lock while deciding makes uniqueness rules (one live session per device,
unique hostnames...) hold across any number of registry replicas: two replicas cannot both
decide on the same state. A refused decision can still carry events (SessionConflictRejected),
which are committed before the error is raised.

Group commit: commands that arrive while a transaction is under way wait, and the next
transaction takes all of them (up to :data:`GROUP_COMMIT_MAX`): each is decided in turn on
the projection with the ones before it applied, its events appended, and one commit makes
the lot durable. A storm of session opens then pays one transaction, one fsync, one
NOTIFY and one relay turn per group instead of per open. The rules stay exact: every
decision sees every event appended before it. Should the group's transaction fail, the
projection holds events that never committed: it is rebuilt from the log before anything
else is decided.

Queries read the projection, which a follower task keeps up with appends made by other
services (through ``serve_appends``) and other replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from services.registry import audit
from services.registry.audit import AuditSlot
from services.registry.domain import api_tokens, vdisks
from services.registry.domain.errors import DomainError
from services.registry.projection import Projection, Record
from services.registry.sealing import Sealer
from shared.envelope import Envelope
from shared.event_store import (
    EventStore,
    StoredEvent,
    Transaction,
    fetch_for_replay,
    gc_paused,
)
from shared.events import Event, ProjectionError, SessionEvent, envelope
from shared.settings import Settings
from shared.telemetry import (
    current_traceparent,
    tracer,
)

log = logging.getLogger("streamboot.registry")

Decision = Callable[[Projection], list[Event]]
# Returns the heartbeats of every instance (shared.heartbeat.HeartbeatView.read).
HeartbeatSource = Callable[[], Awaitable[list[dict[str, Any]]]]
# Tells a stream node (by id) to open a session (token, its resolve answer) ahead of its client.
SessionAnnouncer = Callable[[str, str, Record], Awaitable[None]]

REPLAY_BATCH = 50_000
# Commands decided and committed in one transaction at most.
GROUP_COMMIT_MAX = 256


async def replay(conn: asyncpg.Connection, projection: Projection) -> int:
    """Apply every event after the projection's position; returns how many.

    On the transaction's own connection: a pool connection could deadlock behind writers
    that hold pool connections while they wait for the append lock."""
    n = 0
    with gc_paused():
        while True:
            rows = await fetch_for_replay(conn, projection.position, REPLAY_BATCH)
            n += projection.apply_records(rows)
            if len(rows) < REPLAY_BATCH:
                return n


class CommandCore:
    """The projection, the event store and the one way to change them (:meth:`_execute`);
    the command mixins of :class:`~services.registry.app.RegistryApp` build on it."""

    def __init__(
        self,
        store: EventStore,
        settings: Settings,
        *,
        heartbeats: HeartbeatSource | None = None,
        on_appended: Callable[[], None] | None = None,
        write_caches: Callable[[], Awaitable[tuple[list[Record], bool]]] | None = None,
        announce: SessionAnnouncer | None = None,
    ) -> None:
        self._announce = announce
        # The cache service's per-session write-cache usage (shown with the sessions): every
        # cache node's write caches, and whether every live cache node answered.
        self._write_caches = write_caches
        self.store = store
        self.settings = settings
        self.projection = Projection()
        self.vdisk_root: Path = settings.vdisk_root
        # Where stream and cache nodes may read a vdisk's layers from (vdisk set --store).
        self.stores = {vdisks.LOCAL_STORE, *settings.cache_stores}
        self._heartbeats = heartbeats
        self._on_appended = on_appended or (lambda: None)
        self._lock = asyncio.Lock()
        # (vdisk, version) whose automatic merge failed: not tried again by itself.
        self._unmerged: set[tuple[str, int]] = set()
        self._waiting: list[_Pending] = []  # commands for the next group commit
        self._committer: asyncio.Task[None] | None = None
        # Set when a group's transaction failed after its events were applied.
        self._projection_dirty = False
        self.group_commits = 0  # transactions of grouped commands so far
        self._opens_in_flight = 0  # session opens admitted and not answered (back-pressure)
        self.opens_refused_busy = 0  # session opens answered "busy, retry" so far
        self._tracer = tracer("streamboot.registry")
        self._sealer: Sealer | None = None  # loaded at the first secret it seals or opens
        # (vdisk, layers) -> (when checked, their paths): VdiskCommands._served_layers.
        self._layers_checked: dict[tuple[str, tuple[str, ...]], tuple[float, list[str]]] = {}

    # --- plumbing ---------------------------------------------------------------------

    async def start(self) -> int:
        """Build the projection from the whole log."""
        async with self.store.pool.acquire() as conn:
            n = await replay(conn, self.projection)
        log.info(
            "registry: projection built from %d events (position %d)", n, self.projection.position
        )
        await self.record_projection_errors()
        return n

    async def catch_up(self) -> None:
        async with self.store.pool.acquire() as conn:
            await replay(conn, self.projection)
        await self.record_projection_errors()

    async def record_projection_errors(self) -> None:
        """Append a ProjectionError for each event the projection skipped that the log does
        not name yet (under the append lock after a catch-up: once, whatever the replicas)."""
        pending = self.projection.unrecorded_failures()
        if not pending:
            return
        ids = await self.store.ids_at([f["position"] for f in pending])

        def decide(p: Projection) -> list[Event]:
            # Decided on the caught-up state: another caller may have recorded some.
            return [
                ProjectionError(
                    position=f["position"],
                    event_id=ids.get(f["position"]),
                    skipped_type=f["type"],
                    skipped_stream_id=f["stream_id"],
                    error=f["error"][:1000],
                )
                for f in p.unrecorded_failures()
            ]

        for e in await self._decide_and_append(decide, None, None):
            d = e.data
            log.error(
                "registry: skipped event %s at position %d (%s in %s): %s",
                d["event_id"],
                d["position"],
                d["skipped_type"],
                d["skipped_stream_id"],
                d["error"],
            )

    def projection_errors(self) -> Record:
        """How many events the projection skipped, and the last one (status)."""
        failures = self.projection.failures
        last = failures[max(failures)] if failures else None
        return {"count": len(failures), "last": last}

    def offer(self, rows: Sequence[StoredEvent | Envelope]) -> None:
        """Apply events that are newer than the projection. Appends are serialised by the
        store's lock, so commit order is position order (positions may have holes from
        rolled-back appends): whoever offers, events arrive in order."""
        for row in rows:
            self.projection.apply(row.type, row.data, row.position or 0, row.time, row.stream_id)

    async def follow(self) -> None:
        """Keep the projection up with every append (other services, other replicas)."""
        while True:
            try:
                # What this process appended is applied already: not read back.
                async for row in self.store.follow(
                    self.projection.position, seen=lambda: self.projection.position
                ):
                    self.offer([row])
                    await self.record_projection_errors()
            except Exception as exc:  # PostgreSQL restarting, a dropped connection...
                log.warning("registry: following the log paused (%s)", exc)
                await asyncio.sleep(1.0)

    @staticmethod
    def _envelopes(
        events: list[Event], correlation_id: str | None, traceparent: str | None
    ) -> list[Envelope]:
        return [
            envelope(
                e,
                correlation_id=correlation_id
                or (e.session_id if isinstance(e, SessionEvent) else None),
                traceparent=traceparent,
            )
            for e in events
        ]

    async def _execute(
        self,
        decide: Decision,
        *,
        correlation_id: str | None = None,
        effect: Callable[[], Callable[[], None]] | None = None,
        deadline: float | None = None,
        audited: bool = False,
    ) -> list[Envelope]:
        """Decide and append atomically; ``effect`` runs between the two (file moves) and
        returns its undo, called when the append fails. A command with a ``deadline``
        (loop time: a session open, :meth:`_admit_open`) not decided by then is refused
        busy, with nothing appended. ``audited``: this command decides the admin request's
        answer, whose audit record then commits with it (services/registry/audit.py)."""
        try:
            slot = audit.to_commit() if audited and effect is None else None
            return await self._decide_and_append(decide, correlation_id, effect, deadline, slot)
        finally:
            # The catch-up under the lock may have skipped an event: say so in the log.
            try:
                await self.record_projection_errors()
            except Exception as exc:  # the next command or catch-up records it
                log.warning("registry: could not record a skipped event (%s)", exc)

    async def _decide_and_append(
        self,
        decide: Decision,
        correlation_id: str | None,
        effect: Callable[[], Callable[[], None]] | None,
        deadline: float | None = None,
        audit_slot: AuditSlot | None = None,
    ) -> list[Envelope]:
        if effect is not None:
            return await self._decide_alone(decide, correlation_id, effect)
        pending = _Pending(decide, correlation_id, current_traceparent(), deadline, audit_slot)
        self._waiting.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_groups(), name="group-commit")
        # Shielded: a caller that gives up does not cancel the others' transaction.
        stored, error = await asyncio.shield(pending.done)
        if error is not None:
            raise error
        return stored

    async def _commit_groups(self) -> None:
        """Commit the waiting commands, a group per transaction, until none wait."""
        while self._waiting:
            group = self._waiting[:GROUP_COMMIT_MAX]
            del self._waiting[:GROUP_COMMIT_MAX]
            try:
                await self._commit_group(group)
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    # Before the callers learn of it: they must not see the group's events.
                    await self._clean_projection()
                for p in group:
                    if not p.done.done():
                        p.done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _clean_projection(self) -> None:
        """Rebuild now a projection a failed group left dirty, so queries do not show its
        uncommitted events; if the log cannot be read now, the next command rebuilds it."""
        if not self._projection_dirty:
            return
        try:
            async with self._lock, self.store.transaction() as tx:
                await self._catch_up_in(tx)
        except Exception as exc:
            log.warning("registry: projection not rebuilt yet after a failed commit (%s)", exc)

    async def _commit_group(self, group: list[_Pending]) -> None:
        # Per command: its events, its refusal, and its request's audit record.
        outcomes: list[tuple[_Pending, list[Envelope], Exception | None, list[Envelope]]] = []
        applied = False
        async with self._lock:
            try:
                async with self.store.transaction() as tx:
                    await self._catch_up_in(tx)
                    now = asyncio.get_running_loop().time()
                    for p in group:
                        error: Exception | None = None
                        if p.deadline is not None and now > p.deadline:
                            # Its caller is about to give up: deciding now could open a
                            # session nobody hears of.
                            busy = self._busy("waited too long for its turn")
                            outcomes.append((p, [], busy, []))
                            continue
                        try:
                            events = p.decide(self.projection)
                        except DomainError as exc:
                            error, events = exc, exc.events
                        except Exception as exc:  # this command's fault: the others go on
                            outcomes.append((p, [], exc, []))
                            continue
                        stored = await tx.append(
                            self._envelopes(events, p.correlation_id, p.traceparent), defer=True
                        )
                        record: list[Envelope] = []
                        if error is None and p.audit is not None:
                            record = await tx.append(
                                self._envelopes(_audit_record(p.audit), None, p.traceparent),
                                defer=True,
                            )
                        if len(group) > 1 and (stored or record):
                            # The next decision must see these: applied before the commit.
                            applied = True
                            self.offer(stored + record)
                        outcomes.append((p, stored, error, record))
            except BaseException:
                if applied:
                    self._projection_dirty = True
                raise
            for _, stored, _, record in outcomes:
                self.offer(stored + record)
            self.group_commits += 1
        if any(stored or record for _, stored, _, record in outcomes):
            self._on_appended()
        for p, stored, error, record in outcomes:
            if record and p.audit is not None:
                p.audit.committed = p.audit.answers
            if not p.done.done():
                p.done.set_result((stored, error))

    async def _catch_up_in(self, tx: Transaction) -> None:
        """The projection up with the log, in the transaction holding the append lock
        (rebuilt whole if a failed group left uncommitted events in it). The first read
        also reserves the transaction's first position: one round trip for both."""
        if self._projection_dirty:
            fresh = Projection()
            await replay(tx.conn, fresh)
            self.projection = fresh
            self._projection_dirty = False
            log.warning("registry: projection rebuilt after a failed group commit")
            return
        with gc_paused():
            rows = await tx.read_and_reserve(self.projection.position, REPLAY_BATCH)
            self.projection.apply_records(rows)
        if len(rows) == REPLAY_BATCH:
            await replay(tx.conn, self.projection)

    async def _decide_alone(
        self,
        decide: Decision,
        correlation_id: str | None,
        effect: Callable[[], Callable[[], None]],
    ) -> list[Envelope]:
        """A command with a side effect (file moves) in a transaction of its own: the
        effect runs between the decision and the append, and is undone if they fail."""
        error: DomainError | None = None
        undo: Callable[[], None] | None = None
        async with self._lock:
            try:
                async with self.store.transaction() as tx:
                    await self._catch_up_in(tx)
                    try:
                        events = decide(self.projection)
                    except DomainError as exc:
                        if not exc.events:
                            raise
                        error, events = exc, exc.events
                    if error is None and events:
                        undo = effect()
                    stored = await tx.append(
                        self._envelopes(events, correlation_id, current_traceparent())
                    )
            except BaseException:
                # Not committed (the append or the commit failed): undo the file moves.
                if undo is not None:
                    undo()
                raise
            self.offer(stored)
        if stored:
            self._on_appended()
        if error is not None:
            raise error
        return stored

    async def instances(self) -> list[Record]:
        """Every service instance's last heartbeat (alive or not), for the console."""
        return await self._heartbeats() if self._heartbeats is not None else []

    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 200,
        type_: str | None = None,
        mac: str | None = None,
        newest: bool = False,
    ) -> list[Record]:
        """Events of the log as JSON, filtered by type and/or device (its sessions' own
        events included); ``newest``: the last ``limit`` of them instead of the first."""
        types = [type_] if type_ else None
        if mac:
            rows = await self.store.read_device(
                mac, after, 100_000 if newest else limit, types=types
            )
        elif newest:
            rows = await self.store.read_latest(limit, types=types)
        else:
            rows = await self.store.read_all(after, limit, types=types)
        if newest:
            rows = rows[-limit:]
        return [
            {
                "position": e.position,
                "time": e.time.isoformat(),
                "type": e.type,
                "stream_id": e.stream_id,
                "data": e.data,
            }
            for e in rows
        ]

    # --- rebuild ----------------------------------------------------------------------

    async def rebuild(self) -> Record:
        """Rebuild the projection from the whole log and swap it in; reports whether the
        fresh one equals the live one (it must: both are the same fold of the same log)."""
        async with self._lock, self.store.transaction() as tx:
            await self._catch_up_in(tx)
            fresh = Projection()
            started = time.perf_counter()
            n = await replay(tx.conn, fresh)
            elapsed = time.perf_counter() - started
            equal = fresh.snapshot() == self.projection.snapshot()
            if not equal:
                log.error("registry: rebuilt projection differs from the live one; using it")
            self.projection = fresh
        await self.record_projection_errors()
        return {
            "events": n,
            "position": fresh.position,
            "equal_to_live": equal,
            "projection_errors": len(fresh.failures),
            "seconds": round(elapsed, 3),
            "devices": len(fresh.devices),
            "vdisks": len(fresh.vdisks),
            "live_sessions": len(fresh.sessions),
        }


def _audit_record(slot: AuditSlot) -> list[Event]:
    return api_tokens.admin_action(slot.name, slot.role, slot.method, slot.path, slot.answers or 0)


class _Pending:
    """A command waiting for its group commit; ``done`` gets (its events, its refusal)."""

    __slots__ = ("audit", "correlation_id", "deadline", "decide", "done", "traceparent")

    def __init__(
        self,
        decide: Decision,
        correlation_id: str | None,
        traceparent: str | None,
        deadline: float | None = None,
        audit: AuditSlot | None = None,
    ) -> None:
        self.decide = decide
        self.deadline = deadline
        # The admin request whose audit record commits with this command, if it succeeds.
        self.audit = audit
        self.correlation_id = correlation_id
        self.traceparent = traceparent
        self.done: asyncio.Future[tuple[list[Envelope], Exception | None]] = (
            asyncio.get_running_loop().create_future()
        )
