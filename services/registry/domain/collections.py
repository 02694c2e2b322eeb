"""Collections: groups of devices that share an assignment (and CHAP credentials).

A collection has no record of its own: it exists while a device names it, a vdisk is
assigned to it or it has CHAP credentials. Creating one is giving it members and/or a
vdisk in one decision (:func:`join`); it ends when the last of those goes, or when it is
deleted (:func:`delete`: all of them at once). :func:`rename` moves all of it to a new name.
"""

from __future__ import annotations

from services.registry.domain import assignments, chap
from services.registry.domain.devices import get_device
from services.registry.domain.errors import conflict, invalid, not_found, refused
from services.registry.projection import Projection, Record
from shared.events import AssignmentChanged, DeviceUpdated, Event
from shared.identity import check_name

# Devices one request may move into a collection.
MAX_MEMBERS = 10_000
# Members a refusal names before it says "and N more".
NAMED_IN_REFUSAL = 5


def view(p: Projection) -> list[Record]:
    """Every collection: its devices, its vdisks (the default first) and its CHAP name."""
    names = {d["collection"] for d in p.devices.values() if d["collection"]}
    names |= {t for k, t in p.assignments if k == "collection"}
    names |= {t for k, t in p.chap if k == "collection"}
    out = []
    for name in sorted(names):
        members = sorted(
            (d for d in p.devices.values() if d["collection"] == name),
            key=lambda d: d["hostname"],
        )
        a = p.assignments.get(("collection", name)) or {"vdisks": [], "default": None}
        out.append(
            {
                "name": name,
                "devices": [{"mac": d["mac"], "hostname": d["hostname"]} for d in members],
                # Members with their own assignment boot that, not the collection's.
                "own_assignment": [
                    d["hostname"] for d in members if ("device", d["mac"]) in p.assignments
                ],
                "vdisks": a["vdisks"],
                "default": a["default"],
                "chap": chap.summary(p.chap.get(("collection", name))),
            }
        )
    return out


def join(p: Projection, name: str, macs: list[str], vdisk: str | None) -> list[Event]:
    """Devices ``macs`` move into collection ``name`` and ``vdisk`` is assigned to it
    (its default if it has none yet): a collection is created by its first of these."""
    check_name(name, "collection name")
    if not macs and not vdisk:
        raise invalid(
            f"collection {name!r}: give it devices and/or a vdisk (a collection without "
            "either does not exist)"
        )
    if len(macs) > MAX_MEMBERS:
        raise invalid(f"{len(macs)} devices: at most {MAX_MEMBERS} per request")
    events: list[Event] = []
    if vdisk:
        events += assignments.assign(p, "collection", name, vdisk, default=False)
    moved: set[str] = set()
    for mac in macs:
        dev = get_device(p, mac)
        if dev["collection"] != name and dev["mac"] not in moved:
            moved.add(dev["mac"])
            events.append(DeviceUpdated(mac=dev["mac"], collection=name))
    return events


def delete(p: Projection, name: str, *, release_devices: bool = False) -> list[Event]:
    """The collection ends: its vdisks unassigned and, with ``release_devices``, its
    devices out of it (they stay registered). Refused while devices are in it (deleting
    would silently change what they boot) and while it has CHAP credentials (clearing
    them is an admin's decision: ``streamboot collection set NAME --no-chap``)."""
    members = sorted(
        (d for d in p.devices.values() if d["collection"] == name), key=lambda d: d["hostname"]
    )
    assigned = p.assignments.get(("collection", name))
    if not members and not assigned and ("collection", name) not in p.chap:
        raise not_found(f"no collection {name!r}")
    if ("collection", name) in p.chap:
        raise refused(
            f"collection {name!r} has CHAP credentials: an admin clears them first "
            f"(`streamboot collection set {name} --no-chap`)"
        )
    if members and not release_devices:
        named = ", ".join(d["hostname"] for d in members[:NAMED_IN_REFUSAL])
        more = len(members) - NAMED_IN_REFUSAL
        named += f" and {more} more" if more > 0 else ""
        relying = sum(1 for d in members if ("device", d["mac"]) not in p.assignments)
        left = (
            f"; {relying} of them boot only its vdisks and would have none"
            if assigned and relying
            else ""
        )
        raise conflict(
            f"collection {name!r} still has {len(members)} device(s): {named}{left}. Move "
            "them out first (`streamboot device set MAC --collection ''`), or delete it "
            "with its devices released (`--release-devices`: they stay, in no collection)"
        )
    events: list[Event] = [DeviceUpdated(mac=d["mac"], collection="") for d in members]
    if assigned:
        events.append(
            AssignmentChanged(target_kind="collection", target=name, vdisks=[], default=None)
        )
    return events


def rename(p: Projection, name: str, to: str) -> list[Event]:
    """Every device and the assignment of collection ``name`` move to ``to``, in one
    decision. Refused when ``to`` exists (merging two is a join, then a delete) and while it
    has CHAP credentials (their secrets are sealed to the collection's name)."""
    check_name(to, "collection name")
    names = {c["name"] for c in view(p)}
    if name not in names:
        raise not_found(f"no collection {name!r}")
    if to == name:
        return []
    if to in names:
        raise conflict(
            f"collection {to!r} exists: move {name!r}'s devices into it "
            f"(`streamboot collection create {to} --device MAC ...`), then delete {name!r}"
        )
    if ("collection", name) in p.chap:
        raise refused(
            f"collection {name!r} has CHAP credentials, sealed to its name: an admin clears "
            f"them (`streamboot collection set {name} --no-chap`) and sets them on {to!r} after"
        )
    events: list[Event] = [
        DeviceUpdated(mac=d["mac"], collection=to)
        for d in p.devices.values()
        if d["collection"] == name
    ]
    if (assigned := p.assignments.get(("collection", name))) is not None:
        events += [
            AssignmentChanged(
                target_kind="collection",
                target=to,
                vdisks=list(assigned["vdisks"]),
                default=assigned["default"],
            ),
            AssignmentChanged(target_kind="collection", target=name, vdisks=[], default=None),
        ]
    return events
