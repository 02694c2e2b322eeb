"""Boot session decisions: open (resolve the boot, enforce uniqueness, place), close, and
which sessions the sweeper closes. Time and randomness come in as arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

from services.registry.domain import vdisks as vdisk_rules
from services.registry.domain.assignments import boot_choices
from services.registry.domain.devices import find_device
from services.registry.domain.errors import conflict, invalid, not_found, refused
from services.registry.projection import Projection, Record
from shared.events import (
    Event,
    ReplaySessionOpened,
    SessionClosed,
    SessionConflictRejected,
    SessionOpened,
)
from shared.identity import normalize_mac


@dataclass(frozen=True)
class StreamNode:
    """Where a session streams from: a node's advertised endpoints."""

    node: str
    nbd: str  # "host:port"
    http: str  # "http://host:port"
    load: float = 0.0
    iscsi: str = ""  # "host:port" (none from a node that does not advertise it)


def live_stream_nodes(heartbeats: Sequence[dict[str, Any]]) -> list[StreamNode]:
    """The stream nodes heartbeating now that advertise both endpoints."""
    return [
        StreamNode(
            node=str(b.get("node")),
            nbd=str(b["nbd"]),
            http=str(b["http_stream"]).rstrip("/"),
            iscsi=str(b.get("iscsi") or ""),
            load=float(b.get("load") or 0),
        )
        for b in heartbeats
        if b.get("service") == "stream" and b.get("alive") and b.get("nbd") and b.get("http_stream")
    ]


# Write caches on the client: the server never sees its writes, its export is read-only.
CLIENT_SIDE_CACHES = ("client-ram", "client-disk")


def pick_stream_node(
    heartbeats: Sequence[dict[str, Any]], placed: Mapping[str, Sized] | None = None
) -> StreamNode | None:
    """The least loaded live stream node (ties broken by name, so the choice is stable).
    A node's load is its heartbeat's (its open connections) or, when more, the live
    sessions placed on it (``placed``: the projection's ``live_by_node``): a heartbeat is
    seconds old, and a storm's opens arrive before their clients connect, so without the
    sessions every open of a burst would go to the same node."""
    placed = placed or {}

    def load(n: StreamNode) -> tuple[float, str]:
        return max(n.load, len(placed.get(n.node, ()))), n.node

    return min(live_stream_nodes(heartbeats), key=load, default=None)


def failover_stream_nodes(
    heartbeats: Sequence[dict[str, Any]], chosen: StreamNode
) -> list[StreamNode]:
    """The other live stream nodes, least loaded first: where the session's client goes
    when its node dies (docs/failover.md)."""
    others = [n for n in live_stream_nodes(heartbeats) if n.nbd != chosen.nbd]
    return sorted(others, key=lambda n: (n.load, n.node))


def failover_nodes(heartbeats: Sequence[dict[str, Any]], chosen: StreamNode) -> list[str]:
    """The NBD endpoints of :func:`failover_stream_nodes`."""
    return [n.nbd for n in failover_stream_nodes(heartbeats, chosen)]


def session_url(node: StreamNode, token: str) -> str:
    """A session's HTTP range URL on ``node`` (any node opens any session)."""
    return f"{node.http}/s/{token}"


def open_session(
    p: Projection,
    *,
    mac: str | None,
    smbios_uuid: str | None = None,
    vdisk: str | None = None,
    maintenance: bool = False,
    session_id: str,
    token_hash: str,
    node: StreamNode,
    boot_traceparent: str | None = None,
    boot_started_ns: int | None = None,
    client_addr: str | None = None,
) -> list[Event]:
    """The SessionOpened event of a new boot session, or a DomainError; a uniqueness
    conflict carries a SessionConflictRejected event for the log."""
    dev = find_device(p, mac, smbios_uuid)
    if dev is None:
        who = normalize_mac(mac) if mac else smbios_uuid
        raise not_found(f"unknown device {who}")
    the_mac = dev["mac"]
    if not dev["enabled"]:
        raise refused(f"device {the_mac} ({dev['hostname']}) is disabled")

    def reject(reason: str, other: str | None) -> None:
        raise conflict(
            reason,
            [
                SessionConflictRejected(
                    session_id=session_id, mac=the_mac, reason=reason, conflicting_session_id=other
                )
            ],
        )

    # Bad input first (it changes nothing), then the uniqueness rules (a refusal is logged).
    choices = boot_choices(p, the_mac)
    default = choices["default"] or (choices["vdisks"][0] if choices["vdisks"] else None)
    if vdisk is None:
        if default is None:
            raise conflict(
                f"device {the_mac} has no vdisk assigned (`streamboot assign {the_mac} VDISK`)"
            )
        vdisk = default
    elif vdisk not in choices["vdisks"]:
        vdisk_rules.get_vdisk(p, vdisk)
        raise refused(f"vdisk {vdisk!r} is not assigned to device {the_mac}")
    vd = vdisk_rules.get_vdisk(p, vdisk)
    # A device put in maintenance (`device maintenance MAC on`) maintains its default vdisk.
    maintenance = maintenance or (dev.get("maintenance", False) and vdisk == default)
    version = vdisk_rules.boot_version(vd, tester=dev["tester"], maintenance=maintenance)
    vdisk_rules.boot_plan(vd, version)  # a vdisk that cannot boot as its policy says: refused

    live = p.session_by_mac.get(the_mac)
    # A device booting again while its previous session waits for its OS's iSCSI login:
    # that boot died before the OS logged in (the iBFT boot loop of an image without its
    # NIC driver), so the old session ends here instead of blocking this boot for the
    # hand-off grace.
    replaced: list[Event] = []
    if live is not None and awaiting_handoff(p, p.sessions[live]):
        replaced = close(p, p.sessions[live], "rebooted-before-handoff")
    elif live is not None:
        reject(f"device {the_mac} already has a live session ({live})", live)
    # A replay is not the device: it holds no name or identity (not in these indexes).
    s = p.live_boot_sharing(dev["hostname"], dev["machine_id"])
    if s is not None and not (replaced and s["session_id"] == live):
        if s["hostname"] == dev["hostname"]:
            reject(
                f"hostname {dev['hostname']!r} is in use by live session {s['session_id']}",
                s["session_id"],
            )
        reject(
            f"machine id {dev['machine_id']} is in use by live session {s['session_id']}",
            s["session_id"],
        )

    private = vd["mode"] == "private"
    # Only these two rules look at the vdisk's other sessions (a shared vdisk may have
    # thousands: a standard boot does not walk them).
    for s in p.live_boots_of_vdisk(vdisk) if private or maintenance else ():
        if replaced and s["session_id"] == live:
            continue
        if private:
            reject(
                f"vdisk {vdisk!r} is private and in use by live session {s['session_id']}",
                s["session_id"],
            )
        if maintenance and s.get("maintenance"):
            reject(
                f"vdisk {vdisk!r} is in maintenance by device {s['mac']} (live session "
                f"{s['session_id']}); one device at a time: shut that one down first",
                s["session_id"],
            )
    writes_to_vdisk = private or maintenance
    # A maintenance session's writes must reach the server (they become the next version).
    write_cache = "server-disk" if maintenance else vd["write_cache"]
    persistence = "keep" if writes_to_vdisk else vd["write_cache_persistence"]
    return [
        *replaced,
        SessionOpened(
            session_id=session_id,
            mac=the_mac,
            hostname=dev["hostname"],
            machine_id=dev["machine_id"],
            vdisk=vdisk,
            version=version,
            stream_node=node.node,
            write_cache=write_cache,
            write_cache_persistence=persistence,
            # Client-side write caches: the server export is read-only.
            read_only=write_cache in CLIENT_SIDE_CACHES and not writes_to_vdisk,
            token_hash=token_hash,
            nbd_uri=f"nbd://{node.nbd}/",
            http_url=f"{node.http}/s/",
            iscsi_portal=node.iscsi or None,
            maintenance=maintenance,
            writes_to_vdisk=writes_to_vdisk,
            boot_traceparent=boot_traceparent,
            boot_started_ns=boot_started_ns,
            client_addr=client_addr,
        ),
    ]


def choose_replay_node(
    heartbeats: Sequence[dict[str, Any]], wanted: str | None, used: Sequence[str]
) -> StreamNode:
    """Where a replay runs: the node asked for (it must be alive), else the first node the
    original session used that is still alive, else the least loaded live one. A replay
    measures a node, so unlike a boot it is refused when no node is alive."""
    alive = {n.node: n for n in live_stream_nodes(heartbeats)}
    names = ", ".join(sorted(alive)) or "none"
    if wanted:
        if wanted not in alive:
            raise refused(f"stream node {wanted!r} is not alive (alive stream nodes: {names})")
        return alive[wanted]
    for node in used:
        if node in alive:
            return alive[node]
    node = pick_stream_node(heartbeats)
    if node is None:
        raise refused("no stream node is alive (no heartbeat): a replay needs one to run on")
    return node


def open_replay(
    p: Projection,
    *,
    original: Record,
    session_id: str,
    token_hash: str,
    node: StreamNode,
) -> list[Event]:
    """The ReplaySessionOpened of a replay of ``original`` (its SessionOpened data): the
    same vdisk version through the same kind of write cache, but always discarded: the
    trace's writes exercise the write path as the boot did, and are dropped at close."""
    name, version = original["vdisk"], int(original["version"])
    vd = p.vdisks.get(name)
    if vd is None:
        raise not_found(
            f"vdisk {name!r} of session {original['session_id']} is gone (removed): "
            "nothing to replay against"
        )
    if version not in vd["versions"]:
        raise not_found(
            f"vdisk {name!r} version {version} of session {original['session_id']} is gone"
        )
    if vd["versions"][version].get("retired"):
        # Its files go once the sessions that read them close: a replay would lose them.
        raise conflict(
            f"vdisk {name!r} version {version} of session {original['session_id']} was "
            "merged into a later version's base (`vdisk merge`): nothing to replay against"
        )
    write_cache = original["write_cache"]
    return [
        ReplaySessionOpened(
            session_id=session_id,
            replay_of=original["session_id"],
            original_mac=original["mac"],
            hostname=original["hostname"],
            vdisk=name,
            version=version,
            stream_node=node.node,
            write_cache=write_cache,
            write_cache_persistence="discard",
            # A client-side write cache never wrote to the server: neither does its replay.
            read_only=write_cache in CLIENT_SIDE_CACHES,
            token_hash=token_hash,
            nbd_uri=f"nbd://{node.nbd}/",
            http_url=f"{node.http}/s/",
        )
    ]


def find_session(p: Projection, session_id_or_hash: str, token_hash: str) -> Record:
    sid = session_id_or_hash if session_id_or_hash in p.sessions else None
    sid = sid or p.session_by_token_hash.get(token_hash)
    if sid is None:
        raise not_found("no live session with that token or id")
    return p.sessions[sid]


def close(p: Projection, session: Record, reason: str) -> list[Event]:
    if not reason:
        raise invalid("a session closes for a reason")
    # The data its connections moved, as their SessionDetached events counted it (a
    # connection still attached when the registry closes the session counts in its own
    # SessionDetached, after this).
    return [
        SessionClosed(
            session_id=session["session_id"],
            reason=reason,
            bytes_read=int(session.get("bytes_read", 0)),
            bytes_written=int(session.get("bytes_written", 0)),
        )
    ]


# Boot methods whose disk is logged in to twice: by iPXE's initiator, which never logs
# out, then by the OS's own from the iBFT (Windows' msiscsi, open-iscsi's iscsistart).
HANDOFF_METHODS = ("sanboot-iscsi", "iscsi-ibft")


def awaiting_handoff(p: Projection, s: Record) -> bool:
    """Whether a session boots by an iSCSI hand-off and its OS has not logged in yet: no
    attachment but a boot firmware's (iPXE logs in again whenever its connection drops, so
    counting logins would not do)."""
    if s.get("replay_of") or s.get("os_attaches", 0) > 0:
        return False
    vd = p.vdisks.get(s["vdisk"])
    return vd is not None and vd.get("boot_method") in HANDOFF_METHODS


def expired(
    p: Projection,
    now: float,
    *,
    idle_timeout_s: float,
    detach_grace_s: float,
    handoff_grace_s: float = 0.0,
    alive_nodes: dict[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Sessions to close now, with the reason: the client left (no attachment for the grace
    period after its last detach), or it never came / went quiet (idle timeout).

    A session waiting for its OS's iSCSI login (:func:`awaiting_handoff`) gets
    ``handoff_grace_s`` instead of the detach grace: the firmware's connection it was
    attached by dies silently when the OS starts (found by keepalive), and the OS logs in
    when its initramfs or boot drivers are up, which on a slow machine is minutes later.
    Closed then for "handoff-timeout": the OS never came.

    A session whose stream node died or restarted since its attachments (``alive_nodes``:
    node -> start time of the instance heartbeating now; None = unknown) is not closed for
    that: its client may come back to the node once it is up again, and a close would drop
    its write cache. Only the idle timeout closes it ("stream-node-gone")."""
    out = []
    for s in p.sessions.values():
        if s["attached"] > 0:
            if alive_nodes is None or any(
                node in alive_nodes and alive_nodes[node] <= s.get("attached_at", {}).get(node, 0)
                for node in s.get("attached_on", {})
            ):
                continue
            if now - s["last_activity"] >= idle_timeout_s:
                out.append((s["session_id"], "stream-node-gone"))
            continue
        handoff = awaiting_handoff(p, s)
        grace = max(detach_grace_s, handoff_grace_s) if handoff else detach_grace_s
        if s["detached_at"] is not None and now - s["detached_at"] >= grace:
            out.append((s["session_id"], "handoff-timeout" if handoff else "client-gone"))
        elif now - s["last_activity"] >= idle_timeout_s:
            out.append((s["session_id"], "idle-timeout"))
    return out
