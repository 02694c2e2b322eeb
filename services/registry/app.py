"""The registry's application layer: commands and queries, shared by REST and NATS.

Every command runs the same way (:meth:`RegistryApp._execute`): take the process lock and the
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
import contextlib
import hashlib
import ipaddress
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from opentelemetry import trace

from services.registry import merge as merge_store
from services.registry import vdisk_store
from services.registry.domain import api_tokens, assignments, chap, devices, sessions, vdisks
from services.registry.domain.errors import DomainError, busy, invalid, not_found, refused
from services.registry.domain.sessions import (
    StreamNode,
    choose_replay_node,
    failover_nodes,
    pick_stream_node,
)
from services.registry.projection import Projection, Record
from services.registry.sealing import Sealer, SealingError, load_sealer
from services.registry.wake import send_magic_packet
from shared.contracts.cache.wire import kept_write_cache_key
from shared.contracts.registry import ChapRecord, SessionRecord
from shared.envelope import Envelope, uuid7
from shared.event_store import EventStore, StoredEvent, fetch_for_replay, gc_paused
from shared.events import Event, ProjectionError, SessionEvent, VdiskLayersRemoved, envelope
from shared.iscsi_names import TARGET_PREFIX, initiator_iqn, iscsi_uri
from shared.layer_paths import LayerPathError, check_relative_layer
from shared.metrics import count_boot
from shared.settings import Settings
from shared.telemetry import (
    context_from_traceparent,
    current_traceparent,
    new_traceparent,
    record_span_with_ids,
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


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_token() -> str:
    """256 random bits, URL-safe, never starting with "-": a token is an argument of
    command lines (`streamboot session close TOKEN`, NBD clients' export names), where a
    leading dash reads as an option (1 token in 64 did)."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


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


class RegistryApp:
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

    # --- plumbing ---------------------------------------------------------------------

    async def start(self) -> int:
        """Build the projection from the whole log."""
        async with self.store.pool.acquire() as conn:
            n = await replay(conn, self.projection)
        log.info(
            "registry: projection built from %d events (position %d)", n, self.projection.position
        )
        await self.record_projection_errors()
        if self.settings.sealing_key or self.settings.sealing_key_file:
            _ = self.sealer  # a key given but unusable stops the start, not a later CHAP set
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
                async for row in self.store.follow(self.projection.position):
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
    ) -> list[Envelope]:
        """Decide and append atomically; ``effect`` runs between the two (file moves) and
        returns its undo, called when the append fails. A command with a ``deadline``
        (loop time: a session open, :meth:`_admit_open`) not decided by then is refused
        busy, with nothing appended."""
        try:
            return await self._decide_and_append(decide, correlation_id, effect, deadline)
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
    ) -> list[Envelope]:
        if effect is not None:
            return await self._decide_alone(decide, correlation_id, effect)
        pending = _Pending(decide, correlation_id, current_traceparent(), deadline)
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
                await self._catch_up_in(tx.conn)
        except Exception as exc:
            log.warning("registry: projection not rebuilt yet after a failed commit (%s)", exc)

    async def _commit_group(self, group: list[_Pending]) -> None:
        outcomes: list[tuple[_Pending, list[Envelope], Exception | None]] = []
        applied = False
        async with self._lock:
            try:
                async with self.store.transaction() as tx:
                    await self._catch_up_in(tx.conn)
                    now = asyncio.get_running_loop().time()
                    for p in group:
                        error: Exception | None = None
                        if p.deadline is not None and now > p.deadline:
                            # Its caller is about to give up: deciding now could open a
                            # session nobody hears of.
                            outcomes.append((p, [], self._busy("waited too long for its turn")))
                            continue
                        try:
                            events = p.decide(self.projection)
                        except DomainError as exc:
                            error, events = exc, exc.events
                        except Exception as exc:  # this command's fault: the others go on
                            outcomes.append((p, [], exc))
                            continue
                        stored = await tx.append(
                            self._envelopes(events, p.correlation_id, p.traceparent)
                        )
                        if len(group) > 1 and stored:
                            # The next decision must see these: applied before the commit.
                            applied = True
                            self.offer(stored)
                        outcomes.append((p, stored, error))
            except BaseException:
                if applied:
                    self._projection_dirty = True
                raise
            for _, stored, _ in outcomes:
                self.offer(stored)
            self.group_commits += 1
        if any(stored for _, stored, _ in outcomes):
            self._on_appended()
        for p, stored, error in outcomes:
            if not p.done.done():
                p.done.set_result((stored, error))

    async def _catch_up_in(self, conn: asyncpg.Connection) -> None:
        """The projection up with the log, in the transaction holding the append lock
        (rebuilt whole if a failed group left uncommitted events in it)."""
        if self._projection_dirty:
            fresh = Projection()
            await replay(conn, fresh)
            self.projection = fresh
            self._projection_dirty = False
            log.warning("registry: projection rebuilt after a failed group commit")
        else:
            await replay(conn, self.projection)

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
                    await self._catch_up_in(tx.conn)
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

    # --- devices ----------------------------------------------------------------------

    async def add_device(
        self,
        mac: str,
        *,
        hostname: str | None = None,
        smbios_uuid: str | None = None,
        collection: str | None = None,
        tester: bool = False,
        kernel_args: str | None = None,
    ) -> Record:
        stored = await self._execute(
            lambda p: devices.register(
                p,
                mac,
                hostname=hostname,
                smbios_uuid=smbios_uuid,
                collection=collection,
                tester=tester,
                kernel_args=kernel_args,
            )
        )
        return self.device_view(stored[0].data["mac"])

    async def update_device(self, mac: str, **changes: Any) -> Record:
        await self._execute(lambda p: devices.update(p, mac, **changes))
        return self.show_device(mac)

    async def disable_device(self, mac: str) -> Record:
        await self._execute(lambda p: devices.disable(p, mac))
        return self.show_device(mac)

    async def enable_device(self, mac: str) -> Record:
        await self._execute(lambda p: devices.enable(p, mac))
        return self.show_device(mac)

    async def set_device_maintenance(self, mac: str, on: bool) -> Record:
        """``on``: the device's next PXE boots open a maintenance session on its default
        vdisk (docs/registry.md, "Maintenance through PXE")."""

        def decide(p: Projection) -> list[Event]:
            dev = devices.get_device(p, mac)
            choices = assignments.boot_choices(p, dev["mac"])
            default = choices["default"] or next(iter(choices["vdisks"]), None)
            return devices.set_maintenance(p, mac, on, default)

        await self._execute(decide)
        view = self.show_device(mac)
        a = view["assignment"]
        view["maintenance_vdisk"] = (a["default"] or next(iter(a["vdisks"]), None)) if on else None
        return view

    async def remove_device(self, mac: str) -> Record:
        stored = await self._execute(lambda p: devices.remove(p, mac))
        return {"removed": stored[0].data["mac"]}

    async def instances(self) -> list[Record]:
        """Every service instance's last heartbeat (alive or not), for the console."""
        return await self._heartbeats() if self._heartbeats is not None else []

    async def wake_device(self, mac: str) -> Record:
        """Send a registered device the Wake-on-LAN packet (it then PXE-boots as usual)."""
        d = devices.get_device(self.projection, mac)
        st = self.settings
        try:
            sent_to = await asyncio.to_thread(
                send_magic_packet, d["mac"], st.wol_address, st.wol_port, st.dhcp_interface
            )
        except OSError as exc:
            raise invalid(f"could not send the Wake-on-LAN packet to {d['mac']}: {exc}") from exc
        log.info("registry: Wake-on-LAN packet for %s sent to %s", d["mac"], sent_to)
        return {"mac": d["mac"], "hostname": d["hostname"], "sent_to": sent_to}

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

    def list_devices(self) -> list[Record]:
        return [self.device_view(mac) for mac in sorted(self.projection.devices)]

    def show_device(self, mac: str) -> Record:
        return self.device_view(devices.get_device(self.projection, mac)["mac"])

    def device_view(self, mac: str) -> Record:
        p = self.projection
        found = chap.effective(p, mac)
        return {
            **p.devices[mac],
            "assignment": assignments.boot_choices(p, mac),
            "session": p.session_by_mac.get(mac),
            "chap": chap.summary(found[2]) | {"source": found[0]} if found else None,
        }

    # --- CHAP ---------------------------------------------------------------------------

    @property
    def sealer(self) -> Sealer:
        if self._sealer is None:
            self._sealer = load_sealer(
                self.settings.data_dir, self.settings.sealing_key, self.settings.sealing_key_file
            )
        return self._sealer

    async def set_chap(
        self,
        kind: str,
        target: str,
        *,
        user: str,
        secret: str,
        reverse_user: str | None = None,
        reverse_secret: str | None = None,
    ) -> Record:
        """CHAP credentials for the iSCSI logins of a device or a collection's devices;
        the secrets go into the log sealed (services/registry/sealing.py)."""
        seal = self.sealer.seal
        await self._execute(
            lambda p: chap.set_chap(
                p,
                kind,
                target,
                user=user,
                secret=secret,
                reverse_user=reverse_user,
                reverse_secret=reverse_secret,
                seal=seal,
            )
        )
        return self.chap_view(kind, target)

    async def clear_chap(self, kind: str, target: str) -> Record:
        await self._execute(lambda p: chap.clear_chap(p, kind, target))
        return self.chap_view(kind, target)

    def chap_view(self, kind: str, target: str) -> Record:
        key = chap.target_key(self.projection, kind, target)
        rec = self.projection.chap.get((kind, key))
        return {"target_kind": kind, "target": key, "chap": chap.summary(rec)}

    def chap_record(self, mac: str | None) -> ChapRecord | None:
        """A device's CHAP credentials in clear, for the stream node that checks its logins
        and the boot service that writes them into its iPXE script; never for a view."""
        found = chap.effective(self.projection, mac) if mac else None
        if found is None:
            return None
        kind, key, rec = found
        sealer = self.sealer

        def opened(field: str) -> str | None:
            sealed = rec.get(f"{field}_sealed")
            if sealed is None:
                return None
            try:
                return sealer.open(sealed, chap.seal_context(kind, key, field))
            except SealingError as exc:
                raise refused(f"the CHAP secret of {kind} {key}: {exc}") from None

        return ChapRecord(
            user=rec["user"],
            secret=opened("secret"),
            reverse_user=rec.get("reverse_user"),
            reverse_secret=opened("reverse_secret"),
        )

    async def lookup_device(self, mac: str | None, smbios_uuid: str | None = None) -> Record:
        """A booting device (the boot service asks): who it is and what it may boot. An
        unknown one is auto-added or refused, by the unknown-device policy."""
        dev = await self._known_or_auto_added(mac, smbios_uuid)
        view = self.device_view(dev["mac"])
        p = self.projection
        view["vdisks"] = [
            {
                "name": name,
                "default": name == view["assignment"]["default"],
                "size": p.vdisks[name]["size"],
                "production": vdisks.production_version(p.vdisks[name]),
            }
            for name in view["assignment"]["vdisks"]
            if name in p.vdisks
        ]
        return view

    async def _known_or_auto_added(self, mac: str | None, smbios_uuid: str | None) -> Record:
        dev = devices.find_device(self.projection, mac, smbios_uuid)
        if dev is not None:
            return dev
        if not mac:
            raise not_found(f"unknown device with SMBIOS UUID {smbios_uuid}")
        s = self.settings

        def decide(p: Projection) -> list[Event]:
            if devices.find_device(p, mac, smbios_uuid) is not None:
                return []  # another request added it meanwhile
            return devices.auto_add(
                p,
                mac,
                smbios_uuid,
                policy=s.unknown_device_policy,
                template=s.auto_add_name_template,
                collection=s.auto_add_collection,
            )

        await self._execute(decide)
        found = devices.find_device(self.projection, mac, smbios_uuid)
        assert found is not None
        return found

    # --- assignments ------------------------------------------------------------------

    async def assign(self, kind: str, target: str, vdisk: str, *, default: bool = False) -> Record:
        await self._execute(lambda p: assignments.assign(p, kind, target, vdisk, default=default))
        return self._assignment_view(kind, target)

    async def unassign(self, kind: str, target: str, vdisk: str) -> Record:
        await self._execute(lambda p: assignments.unassign(p, kind, target, vdisk))
        return self._assignment_view(kind, target)

    def _assignment_view(self, kind: str, target: str) -> Record:
        key = devices.get_device(self.projection, target)["mac"] if kind == "device" else target
        a = self.projection.assignments.get((kind, key)) or {"vdisks": [], "default": None}
        return {"target_kind": kind, "target": key, **a}

    def list_assignments(self) -> list[Record]:
        return [
            {"target_kind": k, "target": t, **a}
            for (k, t), a in sorted(self.projection.assignments.items())
        ]

    # --- vdisks -----------------------------------------------------------------------

    def list_vdisks(self) -> list[Record]:
        return [self.vdisk_view(n) for n in sorted(self.projection.vdisks)]

    def vdisk_view(self, name: str) -> Record:
        vd = vdisks.get_vdisk(self.projection, name)
        latest = vdisks.latest_version(vd)
        return {
            "name": vd["name"],
            "size": vd["size"],
            "mode": vd["mode"],
            "write_cache": vd["write_cache"],
            "write_cache_persistence": vd["write_cache_persistence"],
            "store": vd["store"],
            "latest_version": latest,
            "production_version": vdisks.production_version(vd),
            "live_sessions": len(self.projection.live_sessions_of_vdisk(name)),
            "last_maintenance": vd["last_maintenance"],
            "boot_method": vd.get("boot_method", "auto"),
            "kernel": vd.get("kernel"),
            # What each version holds to boot kernel-direct (BootFilesScanned).
            "boot": {
                str(n): v.get("boot") for n, v in sorted(vd["versions"].items()) if v.get("boot")
            },
            # The latest version's chain, for an importer computing the next delta.
            "latest_layers": vdisk_store.layer_paths(
                self.vdisk_root, name, vdisks.chain(vd, latest)
            ),
            **self._chain_view(vd),
        }

    def _chain_view(self, vd: Record) -> Record:
        """How long its chains are and what its layers take on disk (local store)."""
        latest, prod = vdisks.latest_version(vd), vdisks.production_version(vd)
        kept = sorted({x for v in vd["versions"].values() if not v["retired"] for x in v["layers"]})
        view: Record = {
            "chain_length": len(vd["versions"][latest]["layers"]) if latest else 0,
            "production_chain_length": len(vd["versions"][prod]["layers"]) if prod else 0,
            "retired_versions": sorted(n for n, v in vd["versions"].items() if v["retired"]),
            "superseded_layers": list(vd["superseded"]),
            "layers_bytes": None,
            "superseded_bytes": None,
        }
        if vd["store"] == vdisks.LOCAL_STORE:
            files = merge_store.layer_files
            view["layers_bytes"] = merge_store.allocated_bytes(
                files(self.vdisk_root, vd["name"], kept)
            )
            view["superseded_bytes"] = merge_store.allocated_bytes(
                files(self.vdisk_root, vd["name"], vd["superseded"])
            )
        return view

    def commit_source(self, name: str) -> Record:
        """The finished maintenance session whose kept writes would become the next
        version, with where its write cache lives (the cache service's key)."""
        last = vdisks.check_commit(self.projection, name)
        vd = self.projection.vdisks[name]
        return {
            **last,
            "vdisk": name,
            "next_version": last["version"] + 1,
            "size": vd["versions"][last["version"]]["size"],
            "layers": vdisk_store.layer_paths(
                self.vdisk_root, name, vdisks.chain(vd, last["version"])
            ),
            "write_cache_key": kept_write_cache_key(last["mac"], name, last["version"]),
        }

    def versions(self, name: str) -> list[Record]:
        vd = vdisks.get_vdisk(self.projection, name)
        prod = vdisks.production_version(vd)
        return [
            {**v, "current_production": v["version"] == prod}
            for _, v in sorted(vd["versions"].items())
        ]

    async def publish_version(
        self,
        name: str,
        *,
        version: int,
        staging: str,
        layer: str,
        size: int,
        checksum: str,
        changed_blocks: int,
        block_size: int,
        stage: str | None = None,
        mode: str = "standard",
        write_cache: str = "server-disk",
        write_cache_persistence: str = "discard",
        store: str | None = None,
        from_maintenance_session: str | None = None,
        boot: Record | None = None,
    ) -> Record:
        """Register a version staged by ``vdisk_store.stage_version`` (or built from a
        maintenance session's writes): move its files into place and append the events, or
        drop the staging dir and raise. ``boot``: what the importer found to boot
        kernel-direct (``services/registry/boot_files.py``); the staged kernel and initramfs
        are measured here."""
        root = self.vdisk_root
        found = None
        if boot is not None:
            found = {k: v for k, v in boot.items() if v is not None}
            if boot.get("kernel_version"):
                try:
                    found.update(
                        await asyncio.to_thread(vdisk_store.staged_boot_files, root, name, staging)
                    )
                except DomainError:
                    vdisk_store.discard_staged(root, name, staging)
                    raise

        def decide(p: Projection) -> list[Event]:
            if from_maintenance_session is not None:
                last = vdisks.check_commit(p, name)
                if last["session_id"] != from_maintenance_session:
                    raise DomainError(
                        f"vdisk {name!r}: the last maintenance session is {last['session_id']}, "
                        f"not {from_maintenance_session}",
                        "conflict",
                    )
            return vdisks.publish(
                p,
                name,
                version=version,
                stage=stage,
                path=layer,
                size=size,
                checksum=checksum,
                changed_blocks=changed_blocks,
                block_size=block_size,
                mode=mode,
                write_cache=write_cache,
                write_cache_persistence=write_cache_persistence,
                store=store,
                stores=self.stores,
                boot=found,
            )

        def effect() -> Callable[[], None]:
            moved = []
            if found and found.get("kernel_version"):
                moved = vdisk_store.commit_boot_files(root, name, staging, version)
            try:
                moved += vdisk_store.commit_staged(root, name, staging, layer)
            except BaseException:
                for path in moved:
                    path.unlink(missing_ok=True)
                raise

            def undo() -> None:
                for path in moved:
                    path.unlink(missing_ok=True)

            return undo

        try:
            await self._execute(decide, effect=effect)
        finally:
            vdisk_store.discard_staged(root, name, staging)
        return {
            **self.vdisk_view(name),
            "version": self.projection.vdisks[name]["versions"][version],
        }

    async def merge_vdisk(self, name: str, upto: int | None = None) -> Record:
        """Write the chain of version ``upto`` (default: production) as one base layer and
        publish it (``VdiskChainMerged``); then remove what nothing reads any more."""
        root = self.vdisk_root
        version = vdisks.merge_target(self.projection, name, upto)  # bad input: said now
        with merge_store.merge_lock(root, name):
            await self.catch_up()
            version = vdisks.merge_target(self.projection, name, version)
            vd = self.projection.vdisks[name]
            layers = self._served_layers(vd, version)
            base = merge_store.base_name(name, version)
            log.info("registry: merging %s up to version %d (%d layers)", name, version,
                     len(layers))  # fmt: skip
            staging, checksum = await asyncio.to_thread(
                merge_store.stage_base, root, name, layers, version
            )

            def effect() -> Callable[[], None]:
                moved = vdisk_store.commit_staged(root, name, staging, base)
                merge_store.fsync_dir(root / name)

                def undo() -> None:
                    for path in moved:
                        path.unlink(missing_ok=True)

                return undo

            try:
                await self._execute(
                    lambda p: vdisks.merge(p, name, version, base, checksum), effect=effect
                )
            finally:
                vdisk_store.discard_staged(root, name, staging)
        await self.sweep_layers()
        return {**self.vdisk_view(name), "merged_upto": version, "base": base}

    async def auto_merge(self) -> list[str]:
        """Merge every local vdisk whose production chain has more layers than
        ``vdisk_auto_merge_layers`` (0: never)."""
        limit = self.settings.vdisk_auto_merge_layers
        merged: list[str] = []
        if limit <= 0:
            return merged
        for name, vd in sorted(self.projection.vdisks.items()):
            prod = vdisks.production_version(vd)
            if vd["store"] != vdisks.LOCAL_STORE or prod is None:
                continue
            if len(vd["versions"][prod]["layers"]) > limit and (name, prod) not in self._unmerged:
                try:
                    await self.merge_vdisk(name, prod)
                    merged.append(name)
                except DomainError as exc:
                    # Not tried again for this version (a checksum that differs would
                    # rewrite the whole image every round); `vdisk merge` still can.
                    self._unmerged.add((name, prod))
                    log.warning("registry: automatic merge of %s not done: %s", name, exc)
        return merged

    async def sweep_layers(self) -> list[str]:
        """Delete the superseded layer files of merged chains once no session live at the
        merge still lives and no cache node keeps a write cache of a retired version."""
        removed: list[str] = []
        for name, vd in sorted(self.projection.vdisks.items()):
            if not vd["superseded"] or self._still_read(vd):
                continue
            retired = {n for n, v in vd["versions"].items() if v["retired"]}
            if retired and await self._kept_caches_of(name, retired):
                continue
            removed += await self._remove_superseded(name, list(vd["superseded"]))
        return removed

    async def _remove_superseded(self, name: str, gone: list[str]) -> list[str]:
        root = self.vdisk_root
        freed = merge_store.allocated_bytes(merge_store.layer_files(root, name, gone))

        def decide(p: Projection) -> list[Event]:
            now = p.vdisks.get(name)
            # Decided again on the caught-up state: a session or merge may have come.
            if now is None or now["superseded"] != gone or self._still_read(now):
                return []
            return [VdiskLayersRemoved(name=name, layers=gone, bytes_freed=freed)]

        def effect() -> Callable[[], None]:
            merge_store.remove_layers(root, name, gone)
            return lambda: None  # a removal whose event failed is done again

        if not await self._execute(decide, effect=effect):
            return []
        log.info("registry: removed %d merged layer(s) of %s (%d bytes)", len(gone), name, freed)
        return gone

    def _still_read(self, vd: Record) -> bool:
        return any(sid in self.projection.sessions for sid in vd["superseded_readers"])

    async def _kept_caches_of(self, name: str, versions: set[int]) -> bool:
        """Whether a cache node keeps a write cache of one of these versions (or a cache
        node did not answer: then it may)."""
        if self._write_caches is None:
            return False
        try:
            beats = await self._heartbeats() if self._heartbeats is not None else []
            if not any(b.get("service") == "cache" and b.get("alive") for b in beats):
                return False  # no cache node: no write cache is kept anywhere
            caches, complete = await self._write_caches()
        except Exception as exc:
            log.info("registry: write caches unknown (%s); merged layers kept", exc)
            return True
        return not complete or any(
            c.get("vdisk") == name and c.get("version") in versions for c in caches
        )

    async def promote(self, name: str, version: int, to: str) -> Record:
        await self._execute(lambda p: vdisks.promote(p, name, version, to))
        return self.vdisk_view(name)

    async def rollback(self, name: str) -> Record:
        await self._execute(lambda p: vdisks.rollback(p, name))
        return self.vdisk_view(name)

    async def set_policy(self, name: str, **policy: str | None) -> Record:
        await self._execute(lambda p: vdisks.set_policy(p, name, **policy, stores=self.stores))
        return self.vdisk_view(name)

    async def remove_vdisk(self, name: str) -> Record:
        await self._execute(lambda p: vdisks.remove(p, name))
        # After the removal is committed: a crash here leaves files, never a dangling event.
        await asyncio.to_thread(vdisk_store.remove_files, self.vdisk_root, name)
        return {"removed": name}

    # --- sessions ---------------------------------------------------------------------

    async def _place(self) -> tuple[StreamNode, str | None, list[str]]:
        """The session's stream node, a warning when none is alive, and the other live
        nodes' NBD endpoints (its client's failover list)."""
        beats = await self._heartbeats() if self._heartbeats is not None else []
        node = pick_stream_node(beats)
        if node is not None:
            return node, None, failover_nodes(beats, node)
        s = self.settings
        host = s.advertised_host
        return (
            StreamNode(
                node="",
                nbd=f"{host}:{s.nbd_port}",
                http=f"http://{host}:{s.http_stream_port}",
                iscsi=f"{host}:{s.iscsi_port}",
            ),
            "no stream node is alive (no heartbeat); the endpoints are the configured defaults "
            "and will work once a stream node runs there",
            [],
        )

    def _busy(self, why: str) -> DomainError:
        self.opens_refused_busy += 1
        retry = random.randint(1, self.settings.registry_busy_retry_max_s)
        return busy(f"the registry is busy ({why}): nothing was opened, retry in {retry}s", retry)

    @contextlib.contextmanager
    def _admitted_open(self) -> Iterator[float]:
        """Back-pressure on session opens: refused at once (busy) when more are under way
        than can be committed before their callers give up; else admitted, with the
        deadline (loop time) by which it must be decided."""
        if self._opens_in_flight >= self.settings.registry_max_waiting_opens:
            raise self._busy(f"{self._opens_in_flight} session opens under way")
        self._opens_in_flight += 1
        try:
            yield asyncio.get_running_loop().time() + self.settings.registry_open_max_wait_s
        finally:
            self._opens_in_flight -= 1

    async def open_session(
        self,
        mac: str | None,
        *,
        smbios_uuid: str | None = None,
        vdisk: str | None = None,
        maintenance: bool = False,
        correlation_id: str | None = None,
        boot_traceparent: str | None = None,
        boot_started_ns: int | None = None,
        client_addr: str | None = None,
    ) -> Record:
        """A boot session: SessionOpened, plus (in the answer only) the session token, how
        it boots (``boot``: vdisks.boot_plan) and the device's extra kernel arguments.
        ``client_addr``: where the client asked from (the boot service saw it); the
        session's exports accept that address only (docs/security.md)."""
        with self._admitted_open() as deadline:
            return await self._open_session(
                mac, deadline, smbios_uuid=smbios_uuid, vdisk=vdisk, maintenance=maintenance,
                correlation_id=correlation_id, boot_traceparent=boot_traceparent,
                boot_started_ns=boot_started_ns, client_addr=client_addr,
            )  # fmt: skip

    async def _open_session(
        self,
        mac: str | None,
        deadline: float,
        *,
        smbios_uuid: str | None,
        vdisk: str | None,
        maintenance: bool,
        correlation_id: str | None,
        boot_traceparent: str | None,
        boot_started_ns: int | None,
        client_addr: str | None,
    ) -> Record:
        if client_addr is not None:
            client_addr = _check_address(client_addr)
        # One trace per boot: the boot service names the root it began at the first DHCP
        # packet; a client that skipped PXE gets a root here, at the session's opening.
        if not boot_traceparent:
            boot_traceparent, boot_started_ns = new_traceparent(), time.time_ns()
        parent = context_from_traceparent(boot_traceparent)
        if trace.get_current_span().get_span_context().is_valid:
            parent = None  # the caller's span (inside the boot's trace) is the better parent
        with self._tracer.start_as_current_span("registry.session.open", context=parent) as span:
            dev = await self._known_or_auto_added(mac, smbios_uuid)
            span.set_attribute("streamboot.mac", dev["mac"])
            node, warning, others = await self._place()
            token = new_session_token()
            sid = str(uuid7())
            await self._execute(
                lambda p: sessions.open_session(
                    p,
                    mac=dev["mac"],
                    vdisk=vdisk,
                    maintenance=maintenance,
                    session_id=sid,
                    token_hash=token_hash(token),
                    node=node,
                    boot_traceparent=boot_traceparent,
                    boot_started_ns=boot_started_ns,
                    client_addr=client_addr,
                ),
                correlation_id=correlation_id or sid,
                deadline=deadline,
            )
            span.set_attribute("streamboot.session_id", sid)
            count_boot()
            s = self.projection.sessions[sid]
            view = self.session_view(s)
            view.update(
                token=token,
                nbd_uri=view["nbd_uri"] + token,
                http_url=view["http_url"] + token,
                boot=vdisks.boot_plan(self.projection.vdisks[s["vdisk"]], s["version"]),
                kernel_args=self.projection.devices[s["mac"]].get("kernel_args"),
                nbd_nodes=others,
            )
            if view.get("iscsi_portal"):
                view.update(
                    iscsi_target=TARGET_PREFIX + token,
                    iscsi_uri=iscsi_uri(view["iscsi_portal"], token),
                )
            if warning:
                view["warning"] = warning
            await self._announce_session(node.node, token)
            return view

    async def open_replay_session(
        self, original_id: str, *, stream_node: str | None = None
    ) -> Record:
        """A replay session for a past (or live) session's vdisk version, on ``stream_node``
        or the node the original used if alive: see ``ReplaySessionOpened``. No boot is
        counted and no boot trace begins; the caller closes it when done."""
        with self._admitted_open() as deadline:
            return await self._open_replay_session(original_id, stream_node, deadline)

    async def _open_replay_session(
        self, original_id: str, stream_node: str | None, deadline: float
    ) -> Record:
        original, used = await self._recorded_session(original_id)
        beats = await self._heartbeats() if self._heartbeats is not None else []
        node = choose_replay_node(beats, stream_node, used)
        token = new_session_token()
        sid = str(uuid7())
        await self._execute(
            lambda p: sessions.open_replay(
                p, original=original, session_id=sid, token_hash=token_hash(token), node=node
            ),
            correlation_id=sid,
            deadline=deadline,
        )
        view = self.session_view(self.projection.sessions[sid])
        view.update(token=token, nbd_uri=view["nbd_uri"] + token, http_url=view["http_url"] + token)
        await self._announce_session(node.node, token)
        return view

    async def _announce_session(self, node: str, token: str) -> None:
        """Let the session's stream node open it now, while the client is still on its way
        (``shared/contracts/stream.py``). Best effort: without it the client's first
        connection opens the session."""
        if not node or self._announce is None:
            return
        try:
            await self._announce(node, token, await self.resolve(token))
        except Exception as exc:
            log.warning("registry: could not announce a session to stream node %s: %s", node, exc)

    async def _recorded_session(self, session_id: str) -> tuple[Record, list[str]]:
        """A session's SessionOpened data, read from the log (closed sessions are not in
        the projection), and the stream nodes it was attached to, in order."""
        if not session_id:
            raise invalid("which session? (a session id)")
        events = await self.store.read_stream(f"session-{session_id}")
        opened = next((e for e in events if e.type == "SessionOpened"), None)
        if opened is None:
            replay = next((e for e in events if e.type == "ReplaySessionOpened"), None)
            if replay is not None:
                raise invalid(
                    f"session {session_id} is a replay of {replay.data['replay_of']}, "
                    "not a boot: replay that session"
                )
            raise not_found(f"unknown session {session_id}")
        used = [e.data["stream_node"] for e in events if e.type == "SessionAttached"]
        used.append(opened.data.get("stream_node") or "")
        return opened.data, [n for n in dict.fromkeys(used) if n]

    async def close_session(self, token_or_id: str, reason: str = "closed-by-request") -> Record:
        h = token_hash(token_or_id)
        closing: list[Record] = []

        def decide(p: Projection) -> list[Event]:
            s = sessions.find_session(p, token_or_id, h)
            closing.append(dict(s))
            return sessions.close(p, s, reason)

        stored = await self._execute(decide)
        finish_boot_trace(closing[-1], reason, self.projection)
        return {"closed": stored[0].data["session_id"], "reason": reason}

    async def session_status(self, session_id: str) -> Record:
        """Whether a session is live and whether its close is in the log, read from the log
        itself (a replica's projection may lag): what a consumer checks before it acts on a
        SessionClosed it was told of."""
        if not session_id:
            raise invalid("which session? (a session id)")
        rows = await self.store.read_all(
            types=["SessionClosed"], stream_id=f"session-{session_id}", limit=1
        )
        closed = rows[0] if rows else None
        return {
            "session_id": session_id,
            "live": closed is None and session_id in self.projection.sessions,
            "closed": closed is not None,
            "reason": closed.data.get("reason") if closed is not None else None,
        }

    def list_sessions(self) -> list[Record]:
        ss = self.projection.sessions.values()
        return [self.session_view(s) for s in sorted(ss, key=lambda s: s["opened_at"])]

    async def list_sessions_with_usage(self) -> list[Record]:
        """The live sessions with their write-cache usage from the cache nodes
        (``write_cache_used``/``_capacity``; None when it cannot be asked right now, or when
        a live cache node did not answer and the session's cache is not in the answers)."""
        views = self.list_sessions()
        usage: dict[str, Record] = {}
        complete = True
        if self._write_caches is not None:
            try:
                caches, complete = await self._write_caches()
                usage = {c["session_id"]: c for c in caches if c.get("session_id")}
            except Exception as exc:
                log.info("registry: write-cache usage unavailable (%s)", exc)
                for v in views:
                    v["write_cache_used"] = v["write_cache_capacity"] = None
                return views
        for v in views:
            c = usage.get(v["session_id"])
            if c is None and not complete:
                v["write_cache_used"] = v["write_cache_capacity"] = None
                continue
            c = c or {}
            v["write_cache_used"] = c.get("used", 0)
            v["write_cache_capacity"] = c.get("capacity")
            if c.get("node"):
                v["write_cache_node"] = c["node"]
        return views

    @staticmethod
    def session_view(s: Record) -> Record:
        view = {k: v for k, v in s.items() if k != "token_hash"}
        # The device's iSCSI initiator name: its iSCSI logins must give it (a replay is not
        # the device, and has none).
        view["initiator_iqn"] = None if s.get("replay_of") else initiator_iqn(s["mac"])
        return view

    async def resolve(self, token: str) -> Record:
        """What a session token opens, for a stream node."""
        h = token_hash(token)
        sid = self.projection.session_by_token_hash.get(h)
        if sid is None:
            await self.catch_up()  # opened on another replica a moment ago?
            sid = self.projection.session_by_token_hash.get(h)
        if sid is None:
            raise not_found("unknown or closed session token")
        s = self.projection.sessions[sid]
        vd = self.projection.vdisks[s["vdisk"]]
        replay_of = s.get("replay_of")
        return SessionRecord(
            session_id=sid,
            # A replay is not the device: nothing on the node may be keyed by its MAC.
            mac=None if replay_of else s["mac"],
            hostname=s["hostname"],
            vdisk=s["vdisk"],
            version=s["version"],
            size=vd["versions"][s["version"]]["size"],
            layers=self._served_layers(vd, s["version"]),
            read_only=s["read_only"],
            write_cache=s["write_cache"],
            write_cache_persistence=s["write_cache_persistence"],
            writes_to_vdisk=s.get("writes_to_vdisk", False),
            store=vd["store"],
            boot_traceparent=s.get("boot_traceparent"),
            replay_of=replay_of,
            client_addr=s.get("client_addr"),
            # What its iSCSI logins must give (None: no CHAP). Only the stream and boot
            # roles get this answer (shared/bus_access.py): docs/security.md.
            chap=None if replay_of else self.chap_record(s["mac"]),
            initiator_iqn=None if replay_of else initiator_iqn(s["mac"]),
        ).model_dump()

    def _served_layers(self, vd: Record, version: int) -> list[str]:
        """A version's layers as stream and cache nodes find them: paths in this registry's
        vdisk dir for the local store, else relative to the store's root (a share holding
        the same ``<vdisk>/<layer>`` tree)."""
        chain = vdisks.chain(vd, version)
        if vd["store"] == vdisks.LOCAL_STORE:
            return vdisk_store.layer_paths(self.vdisk_root, vd["name"], chain)
        try:
            return [check_relative_layer(rel, vd["name"]) for rel in chain]
        except LayerPathError as exc:
            raise invalid(str(exc)) from None

    async def sweep(self, now: float | None = None) -> list[str]:
        """Close sessions whose client left (after the detach grace) or that idled out."""
        now = time.time() if now is None else now
        s = self.settings
        alive_nodes = await self._alive_stream_nodes()
        due = sessions.expired(
            self.projection,
            now,
            idle_timeout_s=s.session_idle_timeout_s,
            detach_grace_s=s.session_detach_grace_s,
            alive_nodes=alive_nodes,
        )
        closed = []
        for sid, reason in due:
            closing: list[Record] = []

            def decide(
                p: Projection, sid: str = sid, reason: str = reason, closing: list[Record] = closing
            ) -> list[Event]:
                # Re-check on the caught-up state: it may have re-attached or been closed.
                still = {x for x, _ in sessions.expired(
                    p, now, idle_timeout_s=s.session_idle_timeout_s,
                    detach_grace_s=s.session_detach_grace_s, alive_nodes=alive_nodes,
                )}  # fmt: skip
                if sid not in still:
                    return []
                closing.append(dict(p.sessions[sid]))
                return sessions.close(p, p.sessions[sid], reason)

            if await self._execute(decide):
                closed.append(sid)
                finish_boot_trace(closing[-1], reason, self.projection)
        return closed

    async def _alive_stream_nodes(self) -> dict[str, float] | None:
        """The stream nodes heartbeating now, with the start time of their current
        instance (an attachment older than that died with the previous one); None when
        heartbeats cannot be read (then attachments are trusted, not closed on a hunch)."""
        if self._heartbeats is None:
            return None
        try:
            beats = await self._heartbeats()
        except Exception as exc:
            log.warning("registry: heartbeats unreadable (%s); keeping attached sessions", exc)
            return None
        return {
            b["node"]: float(b.get("started_at", 0))
            for b in beats
            if b.get("service") == "stream" and b.get("alive")
        }

    # --- admin API tokens -------------------------------------------------------------

    def api_principal(self, token: str) -> tuple[str, str] | None:
        """The (name, role) of a live API token; None for an unknown or revoked one."""
        name = self.projection.api_token_by_hash.get(token_hash(token))
        return None if name is None else (name, self.projection.api_tokens[name]["role"])

    async def create_api_token(self, name: str, role: str, *, by: str) -> Record:
        """A new token of ``role``: returned here once, only its hash is kept."""
        token = new_session_token()  # the same shape: 256 bits, never starting with "-"
        await self._execute(lambda p: api_tokens.create(p, name, role, token_hash(token), by))
        return {**self._api_token_view(name), "token": token}

    async def revoke_api_token(self, name: str, *, by: str) -> Record:
        await self._execute(lambda p: api_tokens.revoke(p, name, by))
        return self._api_token_view(name)

    def list_api_tokens(self) -> list[Record]:
        """The built-in admin first, then every named token, revoked ones included."""
        p = self.projection
        builtin = {
            "name": api_tokens.BOOTSTRAP_ADMIN,
            "role": "admin",
            "created_by": "DATA_DIR/api-token",
            "created_at": None,
            "revoked_at": None,
            "last_action_at": p.api_token_last_action.get(api_tokens.BOOTSTRAP_ADMIN),
        }
        return [builtin, *(self._api_token_view(n) for n in sorted(p.api_tokens))]

    def _api_token_view(self, name: str) -> Record:
        t = self.projection.api_tokens[name]
        view = {k: v for k, v in t.items() if k != "token_hash"}
        view["last_action_at"] = self.projection.api_token_last_action.get(name)
        return view

    async def record_admin_action(
        self, name: str, role: str, method: str, path: str, status: int
    ) -> None:
        await self._execute(lambda _p: api_tokens.admin_action(name, role, method, path, status))

    # --- rebuild ----------------------------------------------------------------------

    async def rebuild(self) -> Record:
        """Rebuild the projection from the whole log and swap it in; reports whether the
        fresh one equals the live one (it must: both are the same fold of the same log)."""
        async with self._lock, self.store.transaction() as tx:
            await self._catch_up_in(tx.conn)
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


class _Pending:
    """A command waiting for its group commit; ``done`` gets (its events, its refusal)."""

    __slots__ = ("correlation_id", "deadline", "decide", "done", "traceparent")

    def __init__(
        self,
        decide: Decision,
        correlation_id: str | None,
        traceparent: str | None,
        deadline: float | None = None,
    ) -> None:
        self.decide = decide
        self.deadline = deadline
        self.correlation_id = correlation_id
        self.traceparent = traceparent
        self.done: asyncio.Future[tuple[list[Envelope], Exception | None]] = (
            asyncio.get_running_loop().create_future()
        )


def _check_address(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        raise invalid(f"bad client address {addr!r}") from None


def finish_boot_trace(session: Record, reason: str, p: Projection) -> None:
    """Write the boot's root span now that its session ended: from the first DHCP packet (or
    the session's opening) to now, with what the boot moved."""
    tp = session.get("boot_traceparent")
    if not tp:
        return
    start = session.get("boot_started_ns") or int(session["opened_at"] * 1e9)
    record_span_with_ids(
        f"boot {session.get('hostname') or session['mac']}",
        tp,
        start_ns=int(start),
        end_ns=time.time_ns(),
        attributes={
            "streamboot.mac": session["mac"],
            "streamboot.session_id": session["session_id"],
            "streamboot.vdisk": session["vdisk"],
            "streamboot.version": session["version"],
            "streamboot.close_reason": reason,
            "streamboot.bytes_read": int(session.get("bytes_read", 0)),
            "streamboot.bytes_written": int(session.get("bytes_written", 0)),
        },
        tracer_name="streamboot.registry",
    )
