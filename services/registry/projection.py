"""The registry's read model: devices, vdisks, assignments and live sessions, in memory.

It is built by applying the event log in position order, event by event. Each handler
takes its event's catalog model (shared/events.py) and the dispatch is one dict lookup on the
event type to (model, handler): a replayed row's JSON text is parsed straight into its model
by pydantic's JSON parser (one pass in compiled code; ``model_construct`` without checks is
the slower way in Python), so a row the catalog does not accept is skipped like one whose
handler raises (docs/architecture.md has the cost). Event types the registry does not care about (boot,
cache...) cost one failed lookup and are never parsed; ``BlocksRequested``, most of a log, is
applied from its stream id alone. Everything here is derived from the log, so a rebuild
equals the live state (:meth:`Projection.snapshot` is what the rebuild test compares).

Records are plain dicts so they go to JSON (REST, NATS) as they are.

One bad event never stops the fold: an event that does not fit its model, or whose handler
raises, is skipped and kept in :attr:`Projection.failures`; the registry records it once as
a ``ProjectionError`` event (whose handler marks it recorded), so a restart or a rebuild
gets past it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from shared.events import (
    AdminActionPerformed,
    ApiTokenCreated,
    ApiTokenRevoked,
    AssignmentChanged,
    BlocksRequested,
    BootFilesScanned,
    DeviceDisabled,
    DeviceEnabled,
    DeviceMaintenanceChanged,
    DeviceRegistered,
    DeviceRemoved,
    DeviceUpdated,
    Event,
    IscsiChapChanged,
    ProjectionError,
    ReplaySessionOpened,
    SessionAttached,
    SessionClosed,
    SessionDetached,
    SessionOpened,
    VdiskChainMerged,
    VdiskCreated,
    VdiskLayersRemoved,
    VdiskPolicyChanged,
    VdiskRemoved,
    VdiskRolledBack,
    VdiskVersionPromoted,
    VdiskVersionPublished,
)
from shared.layer_paths import check_layer_name

Record = dict[str, Any]
# A handler takes its event's model (each its own type) and the event's time.
Handler = Callable[[Any, Any], None]


def _ts(when: Any) -> float:
    """An event time as epoch seconds (rows carry datetimes, tests may pass floats)."""
    return when.timestamp() if isinstance(when, datetime) else float(when or 0.0)


MIN_BLOCK_SIZE = 512
# SessionDetached.reason of the connections a stream node ends as it stops.
NODE_STOPPED = "shutdown"


def check_version(vd: Record, e: VdiskVersionPublished) -> None:
    """A published version must fit its vdisk: the next number after the latest, its
    parent the one before, its layer a plain file of the vdisk's own folder, its size not
    empty and its changed blocks within it. Raises ValueError naming what is wrong."""
    name, version = vd["name"], e.version
    expected = max(vd["versions"], default=0) + 1
    if version != expected:
        raise ValueError(f"vdisk {name!r}: version {version} out of order (next is {expected})")
    if e.parent != (version - 1 if version > 1 else None):
        raise ValueError(f"vdisk {name!r}: version {version} has parent {e.parent}")
    check_layer_name(name, e.path)
    size, bs, changed = e.size, e.block_size, e.changed_blocks
    if size <= 0:
        raise ValueError(f"vdisk {name!r}: version {version} is empty ({size} bytes)")
    if bs < MIN_BLOCK_SIZE or bs & (bs - 1):
        raise ValueError(f"vdisk {name!r}: block size {bs} is not a power of two >= 512")
    if not 0 <= changed <= -(-size // bs):
        raise ValueError(f"vdisk {name!r}: {changed} changed blocks in {size} bytes")


CHAP_FIELDS = ("user", "secret_sealed", "reverse_user", "reverse_secret_sealed")


class Projection:
    def __init__(self) -> None:
        self.position = 0
        self.devices: dict[str, Record] = {}
        self.mac_by_hostname: dict[str, str] = {}
        self.mac_by_machine_id: dict[str, str] = {}
        self.mac_by_uuid: dict[str, str] = {}
        self.auto_added = 0
        self.vdisks: dict[str, Record] = {}
        # ("device", mac) / ("collection", name) -> {"vdisks": [...], "default": name|None}
        self.assignments: dict[tuple[str, str], Record] = {}
        # ("device", mac) / ("collection", name) -> the IscsiChapChanged data (secrets sealed)
        self.chap: dict[tuple[str, str], Record] = {}
        # Live sessions only; closed ones are history, kept in the log.
        self.sessions: dict[str, Record] = {}
        self.session_by_mac: dict[str, str] = {}
        self.session_by_token_hash: dict[str, str] = {}
        # The live sessions by what a new boot must not share with them, each in opening
        # order (derived from ``sessions``: a session open checks these, not every session).
        # Hostname and machine id: the devices' own boots; vdisk: replays included.
        self.live_by_hostname: dict[str, dict[str, None]] = {}
        self.live_by_machine_id: dict[str, dict[str, None]] = {}
        self.live_by_vdisk: dict[str, dict[str, None]] = {}
        # Admin API tokens by name (revoked ones kept: a name is never reused), the live
        # ones by hash, and when each name last did a mutating request.
        self.api_tokens: dict[str, Record] = {}
        self.api_token_by_hash: dict[str, str] = {}
        self.api_token_last_action: dict[str, float] = {}
        # Events skipped because their handler raised: position -> what and why.
        self.failures: dict[int, Record] = {}
        # Positions of skipped events that a ProjectionError in the log already names.
        self.recorded_failures: set[int] = set()
        # Keyed by the catalog's models: a handler for a type the catalog lacks fails here.
        handlers: dict[type[Event], Handler] = {
            DeviceRegistered: self._device_registered,
            DeviceUpdated: self._device_updated,
            DeviceDisabled: self._device_disabled,
            DeviceEnabled: self._device_enabled,
            DeviceRemoved: self._device_removed,
            DeviceMaintenanceChanged: self._device_maintenance,
            AssignmentChanged: self._assignment_changed,
            IscsiChapChanged: self._chap_changed,
            VdiskCreated: self._vdisk_created,
            VdiskVersionPublished: self._version_published,
            VdiskVersionPromoted: self._version_promoted,
            VdiskRolledBack: self._rolled_back,
            VdiskPolicyChanged: self._policy_changed,
            BootFilesScanned: self._boot_files_scanned,
            VdiskRemoved: self._vdisk_removed,
            VdiskChainMerged: self._chain_merged,
            VdiskLayersRemoved: self._layers_removed,
            SessionOpened: self._session_opened,
            ReplaySessionOpened: self._replay_session_opened,
            SessionAttached: self._session_attached,
            SessionDetached: self._session_detached,
            SessionClosed: self._session_closed,
            BlocksRequested: self._session_active,
            ApiTokenCreated: self._api_token_created,
            ApiTokenRevoked: self._api_token_revoked,
            AdminActionPerformed: self._admin_action,
            ProjectionError: self._projection_error,
        }
        # Event type -> (its model, its handler): a stored row is parsed into the model the
        # handler takes, so a row that does not fit the catalog is skipped like a handler
        # that raises.
        self._handlers: dict[str, tuple[type[Event], Handler]] = {
            kind.event_type(): (kind, h) for kind, h in handlers.items()
        }
        # Events that a replay applies from their stream's key, without decoding their data:
        # block batches are most of a log, and their extents the costliest data to decode.
        # (type -> the stream kind's prefix, the handler of the key and the time.) Session
        # events live in their session's stream, session-<session_id>
        # (shared.events.stream_id_for); an event in another stream is decoded as usual.
        self._by_stream_key: dict[str, tuple[str, Callable[[str, Any], None]]] = {
            BlocksRequested.event_type(): ("session-", self._touch_session),
        }

    # --- applying ---------------------------------------------------------------------

    def apply(
        self, type_: str, data: Record | Event, position: int, when: Any = None, stream: str = ""
    ) -> None:
        """Apply one event (its model, or its data as the log holds it); events at or before
        the current position are skipped, so the follower and the writers may both offer
        the same event."""
        if position <= self.position:
            return
        entry = self._handlers.get(type_)
        if entry is not None:
            model, handler = entry
            try:
                handler(data if isinstance(data, model) else model.model_validate(data), when)
            except Exception as exc:
                self._failed(position, type_, stream, exc)
        self.position = position

    def apply_records(self, rows: Sequence[Any]) -> int:
        """Apply (position, type, data as JSON text, time, stream id) records
        (shared.event_store.fetch_for_replay): :meth:`apply` inlined, and an event's data is
        parsed only when a handler needs it, straight from the JSON text into its model
        (pydantic's JSON parser: one pass, no intermediate dict)."""
        handlers = self._handlers
        by_stream_key = self._by_stream_key
        position = self.position
        try:
            for at, type_, data, when, stream in rows:
                if at <= position:
                    continue
                entry = handlers.get(type_)
                if entry is not None:
                    keyed = by_stream_key.get(type_)
                    try:
                        if keyed is not None and stream.startswith(keyed[0]):
                            keyed[1](stream[len(keyed[0]) :], when)
                        else:
                            entry[1](entry[0].model_validate_json(data), when)
                    except Exception as exc:
                        self._failed(at, type_, stream, exc)
                position = at
        finally:
            self.position = position
        return len(rows)

    def apply_rows(self, rows: Iterable[Any]) -> int:
        """Apply stored rows/envelopes (anything with type, data, position, time)."""
        n = 0
        apply = self.apply
        for row in rows:
            apply(row.type, row.data, row.position, row.time, row.stream_id)
            n += 1
        return n

    # --- events that cannot be applied ------------------------------------------------

    def _failed(self, position: int, type_: str, stream: str, exc: Exception) -> None:
        self.failures[position] = {
            "position": position,
            "type": type_,
            "stream_id": stream,
            "error": f"{type(exc).__name__}: {exc}",
        }

    def _projection_error(self, e: ProjectionError, _when: Any) -> None:
        self.recorded_failures.add(int(e.position))

    def unrecorded_failures(self) -> list[Record]:
        """Skipped events that no ProjectionError in the log names yet, in log order."""
        return [f for at, f in sorted(self.failures.items()) if at not in self.recorded_failures]

    # --- devices ----------------------------------------------------------------------

    def _device_registered(self, e: DeviceRegistered, when: Any) -> None:
        mac = e.mac
        self.devices[mac] = {
            "mac": mac,
            "machine_id": e.machine_id,
            "hostname": e.hostname,
            "smbios_uuid": e.smbios_uuid,
            "collection": e.collection,
            "tester": bool(e.tester),
            "enabled": True,
            "auto_added": bool(e.auto_added),
            "kernel_args": e.kernel_args,
            # Its next PXE boots open a maintenance session (DeviceMaintenanceChanged).
            "maintenance": False,
            "registered_at": _ts(when),
        }
        self.mac_by_hostname[e.hostname] = mac
        self.mac_by_machine_id[e.machine_id] = mac
        if e.smbios_uuid:
            self.mac_by_uuid[e.smbios_uuid] = mac
        if e.auto_added:
            self.auto_added += 1

    def _device_updated(self, e: DeviceUpdated, _when: Any) -> None:
        dev = self.devices[e.mac]
        if e.hostname is not None:
            del self.mac_by_hostname[dev["hostname"]]
            dev["hostname"] = e.hostname
            self.mac_by_hostname[e.hostname] = dev["mac"]
        if e.smbios_uuid is not None:
            if dev["smbios_uuid"]:
                self.mac_by_uuid.pop(dev["smbios_uuid"], None)
            dev["smbios_uuid"] = e.smbios_uuid
            self.mac_by_uuid[e.smbios_uuid] = dev["mac"]
        if e.collection is not None:
            # "" clears the collection.
            dev["collection"] = e.collection or None
        if e.tester is not None:
            dev["tester"] = e.tester
        if e.kernel_args is not None:
            dev["kernel_args"] = e.kernel_args or None  # "" clears them

    def _device_disabled(self, e: DeviceDisabled, _when: Any) -> None:
        self.devices[e.mac]["enabled"] = False

    def _device_enabled(self, e: DeviceEnabled, _when: Any) -> None:
        self.devices[e.mac]["enabled"] = True

    def _device_maintenance(self, e: DeviceMaintenanceChanged, _when: Any) -> None:
        self.devices[e.mac]["maintenance"] = bool(e.maintenance)

    def _device_removed(self, e: DeviceRemoved, _when: Any) -> None:
        if e.mac not in self.devices:
            raise ValueError(f"device {e.mac} is not registered")
        dev = self.devices.pop(e.mac)
        self.mac_by_hostname.pop(dev["hostname"], None)
        self.mac_by_machine_id.pop(dev["machine_id"], None)
        if dev["smbios_uuid"]:
            self.mac_by_uuid.pop(dev["smbios_uuid"], None)
        self.assignments.pop(("device", dev["mac"]), None)
        self.chap.pop(("device", dev["mac"]), None)

    def _assignment_changed(self, e: AssignmentChanged, _when: Any) -> None:
        key = (e.target_kind, e.target)
        if e.vdisks:
            self.assignments[key] = {"vdisks": list(e.vdisks), "default": e.default}
        else:
            self.assignments.pop(key, None)

    def _chap_changed(self, e: IscsiChapChanged, _when: Any) -> None:
        key = (e.target_kind, e.target)
        if e.user:
            self.chap[key] = {k: getattr(e, k) for k in CHAP_FIELDS}
        else:
            self.chap.pop(key, None)

    # --- vdisks -----------------------------------------------------------------------

    def _vdisk_created(self, e: VdiskCreated, when: Any) -> None:
        self.vdisks[e.name] = {
            "name": e.name,
            "size": e.size,
            "mode": e.mode,
            "write_cache": e.write_cache,
            "write_cache_persistence": e.write_cache_persistence,
            "store": e.store,
            "boot_method": "auto",
            "kernel": None,  # the operator's pick of kernel version
            "created_at": _ts(when),
            "versions": {},
            # Production versions in promotion order; the last one is what clients boot.
            "production_history": [],
            # The last closed maintenance session: its kept writes make the next version.
            "last_maintenance": None,
            # Layer files of merged-away chains that may still be read (VdiskChainMerged),
            # until they are removed (VdiskLayersRemoved).
            "superseded": [],
            # The sessions live when those chains were merged: they read the old files
            # (their stream nodes opened them), so the files stay while any of them lives.
            "superseded_readers": [],
        }

    def _version_published(self, e: VdiskVersionPublished, when: Any) -> None:
        vd = self.vdisks[e.name]
        check_version(vd, e)
        parent = vd["versions"].get(e.version - 1)
        vd["versions"][e.version] = {
            "version": e.version,
            "parent": e.parent,
            "stage": e.stage,
            "path": e.path,
            "size": e.size,
            "checksum": e.checksum,
            "changed_blocks": e.changed_blocks,
            "block_size": e.block_size,
            "withdrawn": False,
            # The files it reads, oldest first: its parent's and its own (a merge changes it).
            "layers": [*(parent["layers"] if parent else []), e.path],
            # Merged away into a later version's base: no boot picks it.
            "retired": False,
            "published_at": _ts(when),
            "boot": None,  # BootFilesScanned
        }
        vd["size"] = e.size
        vd["last_maintenance"] = None  # committed, or superseded by an import
        if e.stage == "production":
            vd["production_history"].append(e.version)

    def _version_promoted(self, e: VdiskVersionPromoted, _when: Any) -> None:
        vd = self.vdisks[e.name]
        ver = vd["versions"][e.version]
        ver["stage"] = e.stage
        ver["withdrawn"] = False
        if e.stage == "production":
            vd["production_history"].append(e.version)

    def _rolled_back(self, e: VdiskRolledBack, _when: Any) -> None:
        vd = self.vdisks[e.name]
        history = vd["production_history"]
        if history and history[-1] == e.from_version:
            history.pop()
        # The withdrawn version stays on disk (old sessions still read it) but no new boot
        # picks it, testers included, until it is promoted again.
        vd["versions"][e.from_version]["withdrawn"] = True

    def _policy_changed(self, e: VdiskPolicyChanged, _when: Any) -> None:
        vd = self.vdisks[e.name]
        for key in ("mode", "write_cache", "write_cache_persistence", "store", "boot_method"):
            if (value := getattr(e, key)) is not None:
                vd[key] = value
        if e.kernel is not None:
            vd["kernel"] = e.kernel or None  # "" clears the pick

    def _boot_files_scanned(self, e: BootFilesScanned, _when: Any) -> None:
        ver = self.vdisks[e.name]["versions"].get(e.version)
        if ver is not None:
            ver["boot"] = e.model_dump(mode="json", exclude={"name", "version"})

    def _chain_merged(self, e: VdiskChainMerged, _when: Any) -> None:
        vd = self.vdisks[e.name]
        name, versions = vd["name"], vd["versions"]
        new = {int(v): list(layers) for v, layers in e.layers.items()}
        for v, layers in new.items():
            if v not in versions or v < e.upto or not layers or layers[0] != e.base:
                raise ValueError(
                    f"vdisk {name!r}: merged chain of version {v} is not over the base"
                )
            for layer in layers:
                check_layer_name(name, layer)
        for v in e.retired:
            if v not in versions or v >= e.upto:
                raise ValueError(f"vdisk {name!r}: version {v} cannot be retired by this merge")
        for layer in e.superseded:
            check_layer_name(name, layer)
        for v, layers in new.items():
            versions[v]["layers"] = layers
        for v in e.retired:
            versions[v]["retired"] = True
        vd["superseded"] = sorted({*vd["superseded"], *e.superseded})
        live = {sid for sid, s in self.sessions.items() if s["vdisk"] == name}
        vd["superseded_readers"] = sorted({*vd["superseded_readers"], *live})

    def _layers_removed(self, e: VdiskLayersRemoved, _when: Any) -> None:
        vd = self.vdisks[e.name]
        gone = set(e.layers)
        vd["superseded"] = [x for x in vd["superseded"] if x not in gone]
        if not vd["superseded"]:
            vd["superseded_readers"] = []

    def _vdisk_removed(self, e: VdiskRemoved, _when: Any) -> None:
        name = e.name
        del self.vdisks[name]
        # Assignments naming it lose it (and their default, if it was the default).
        for key, a in list(self.assignments.items()):
            if name in a["vdisks"]:
                a["vdisks"] = [v for v in a["vdisks"] if v != name]
                if a["default"] == name:
                    a["default"] = a["vdisks"][0] if a["vdisks"] else None
                if not a["vdisks"]:
                    del self.assignments[key]

    # --- sessions ---------------------------------------------------------------------

    def _session_opened(self, e: SessionOpened, when: Any) -> None:
        sid = e.session_id
        at = _ts(when)
        self.sessions[sid] = {
            **e.model_dump(),
            "opened_at": at,
            "last_activity": at,
            "attached": 0,
            # Live attachments per stream node: those on a node that stopped heartbeating
            # are gone with it (a killed node never reports its clients' detach).
            "attached_on": {},
            "detached_at": None,
        }
        self.session_by_mac[e.mac] = sid
        if e.token_hash:
            self.session_by_token_hash[e.token_hash] = sid
        self._index_live(self.sessions[sid])

    def _replay_session_opened(self, e: ReplaySessionOpened, when: Any) -> None:
        """A replay is a live session (resolve, close and the sweeper treat it like any),
        but not the device's: it takes no ``session_by_mac`` slot and holds no machine
        identity, so the device's own boots are never refused because of it."""
        sid = e.session_id
        at = _ts(when)
        self.sessions[sid] = {
            **e.model_dump(),
            "mac": e.original_mac,
            "machine_id": None,
            "maintenance": False,
            "writes_to_vdisk": False,
            "opened_at": at,
            "last_activity": at,
            "attached": 0,
            "attached_on": {},
            "detached_at": None,
        }
        if e.token_hash:
            self.session_by_token_hash[e.token_hash] = sid
        self._index_live(self.sessions[sid])

    def _index_live(self, s: Record, *, add: bool = True) -> None:
        keys = [(self.live_by_vdisk, s["vdisk"])]
        if not s.get("replay_of"):  # a replay holds no name or identity
            keys += [
                (self.live_by_hostname, s["hostname"]),
                (self.live_by_machine_id, s["machine_id"]),
            ]
        for index, key in keys:
            if add:
                index.setdefault(key, {})[s["session_id"]] = None
            elif (ids := index.get(key)) is not None:
                ids.pop(s["session_id"], None)
                if not ids:
                    del index[key]

    def _session_attached(self, e: SessionAttached, when: Any) -> None:
        s = self.sessions.get(e.session_id)
        if s is not None:
            s["attached"] += 1
            node = e.stream_node
            s["attached_on"][node] = s["attached_on"].get(node, 0) + 1
            s.setdefault("attached_at", {})[node] = _ts(when)
            s["detached_at"] = None
            s["last_activity"] = _ts(when)

    def _session_detached(self, e: SessionDetached, when: Any) -> None:
        s = self.sessions.get(e.session_id)
        if s is not None:
            s["attached"] = max(0, s["attached"] - 1)
            s["bytes_read"] = s.get("bytes_read", 0) + e.bytes_read
            s["bytes_written"] = s.get("bytes_written", 0) + e.bytes_written
            node = e.stream_node
            left = s["attached_on"].get(node, 0) - 1
            if left > 0:
                s["attached_on"][node] = left
            else:
                s["attached_on"].pop(node, None)
            at = _ts(when)
            s["last_activity"] = at
            # A node that stops ends its connections ("shutdown"): the client did not
            # leave, and may come back once the node is up again (the idle timeout decides).
            if s["attached"] == 0 and e.reason != NODE_STOPPED:
                s["detached_at"] = at

    def _session_active(self, e: BlocksRequested, when: Any) -> None:
        self._touch_session(e.session_id, when)

    def _touch_session(self, session_id: str, when: Any) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s["last_activity"] = _ts(when)

    def _session_closed(self, e: SessionClosed, _when: Any) -> None:
        s = self.sessions.pop(e.session_id, None)
        if s is None:
            return
        self._index_live(s, add=False)
        if self.session_by_mac.get(s["mac"]) == s["session_id"]:
            del self.session_by_mac[s["mac"]]
        if s.get("token_hash"):
            self.session_by_token_hash.pop(s["token_hash"], None)
        if s.get("maintenance"):
            vd = self.vdisks.get(s["vdisk"])
            if vd is not None:
                vd["last_maintenance"] = {
                    "session_id": s["session_id"],
                    "mac": s["mac"],
                    "version": s["version"],
                    "write_cache": s["write_cache"],
                }

    # --- admin API tokens -------------------------------------------------------------

    def _api_token_created(self, e: ApiTokenCreated, when: Any) -> None:
        name = e.token_name
        self.api_tokens[name] = {
            "name": name,
            "role": e.role,
            "token_hash": e.token_hash,
            "created_by": e.created_by,
            "created_at": _ts(when),
            "revoked_at": None,
        }
        self.api_token_by_hash[e.token_hash] = name

    def _api_token_revoked(self, e: ApiTokenRevoked, when: Any) -> None:
        t = self.api_tokens.get(e.token_name)
        if t is not None and t["revoked_at"] is None:
            t["revoked_at"] = _ts(when)
            self.api_token_by_hash.pop(t["token_hash"], None)

    def _admin_action(self, e: AdminActionPerformed, when: Any) -> None:
        self.api_token_last_action[e.token_name] = _ts(when)

    # --- queries used by decisions and views ------------------------------------------

    def device_by_uuid(self, smbios_uuid: str) -> Record | None:
        mac = self.mac_by_uuid.get(smbios_uuid)
        return self.devices.get(mac) if mac else None

    def assignment_for(self, mac: str) -> Record | None:
        """The device's own assignment, else its collection's."""
        own = self.assignments.get(("device", mac))
        if own:
            return own
        dev = self.devices.get(mac)
        if dev and dev["collection"]:
            return self.assignments.get(("collection", dev["collection"]))
        return None

    def live_sessions_of_vdisk(self, name: str) -> list[Record]:
        """Every live session reading the vdisk, replays included (its files are in use)."""
        return [self.sessions[sid] for sid in self.live_by_vdisk.get(name, ())]

    def live_boot_sharing(self, hostname: str, machine_id: str) -> Record | None:
        """The first-opened live boot (replays left out) with this hostname or machine id."""
        ids = [
            *self.live_by_hostname.get(hostname, ()),
            *self.live_by_machine_id.get(machine_id, ()),
        ]
        if not ids:
            return None
        order = {sid: n for n, sid in enumerate(self.sessions)} if len(ids) > 1 else {}
        return self.sessions[min(ids, key=lambda sid: order.get(sid, 0))]

    def live_boots_of_vdisk(self, name: str) -> list[Record]:
        """The devices' own live sessions on the vdisk (replays left out): what the
        one-device-at-a-time rules of private and maintenance vdisks count."""
        return [s for s in self.live_sessions_of_vdisk(name) if not s.get("replay_of")]

    def snapshot(self) -> dict[str, Any]:
        """Everything the projection knows, as comparable plain data (the rebuild check)."""
        return {
            "position": self.position,
            "devices": self.devices,
            "mac_by_hostname": self.mac_by_hostname,
            "mac_by_machine_id": self.mac_by_machine_id,
            "mac_by_uuid": self.mac_by_uuid,
            "auto_added": self.auto_added,
            "vdisks": self.vdisks,
            "assignments": {f"{k}:{t}": v for (k, t), v in self.assignments.items()},
            "sessions": self.sessions,
            "session_by_mac": self.session_by_mac,
            "session_by_token_hash": self.session_by_token_hash,
            "api_tokens": self.api_tokens,
            "api_token_by_hash": self.api_token_by_hash,
            "api_token_last_action": self.api_token_last_action,
            "failures": self.failures,
            "recorded_failures": sorted(self.recorded_failures),
        }
