"""Assignment decisions: the ordered vdisks of a device or a collection, with a default."""

from __future__ import annotations

from services.registry.domain.devices import get_device
from services.registry.domain.errors import invalid, not_found
from services.registry.domain.vdisks import get_vdisk
from services.registry.projection import Projection, Record
from shared.events import AssignmentChanged, Event
from shared.identity import check_name


def _target(p: Projection, kind: str, target: str) -> str:
    if kind == "device":
        return get_device(p, target)["mac"]
    if kind == "collection":
        return check_name(target, "collection name")
    raise invalid(f"unknown assignment target kind {kind!r}: device or collection")


def assign(p: Projection, kind: str, target: str, vdisk: str, *, default: bool) -> list[Event]:
    """Add a vdisk at the end of the target's list (or keep its place); the first vdisk, or
    one given with ``default``, becomes the default."""
    key = _target(p, kind, target)
    get_vdisk(p, vdisk)
    current = p.assignments.get((kind, key)) or {"vdisks": [], "default": None}
    vdisks = list(current["vdisks"])
    if vdisk not in vdisks:
        vdisks.append(vdisk)
    new_default = vdisk if default or current["default"] is None else current["default"]
    if vdisks == current["vdisks"] and new_default == current["default"]:
        return []
    return [
        AssignmentChanged(
            target_kind=kind,  # type: ignore[arg-type]
            target=key,
            vdisks=vdisks,
            default=new_default,
        )
    ]


def unassign(p: Projection, kind: str, target: str, vdisk: str) -> list[Event]:
    key = _target(p, kind, target)
    current = p.assignments.get((kind, key))
    if not current or vdisk not in current["vdisks"]:
        raise not_found(f"vdisk {vdisk!r} is not assigned to {kind} {key}")
    vdisks = [v for v in current["vdisks"] if v != vdisk]
    default = current["default"] if current["default"] != vdisk else (vdisks[0] if vdisks else None)
    return [
        AssignmentChanged(
            target_kind=kind,  # type: ignore[arg-type]
            target=key,
            vdisks=vdisks,
            default=default,
        )
    ]


def boot_choices(p: Projection, mac: str) -> Record:
    """What a device may boot: ``{"vdisks": [...], "default": ..., "source": ...}``."""
    own = p.assignments.get(("device", mac))
    if own:
        return {**own, "source": "device"}
    dev = p.devices.get(mac)
    if dev and dev["collection"]:
        coll = p.assignments.get(("collection", dev["collection"]))
        if coll:
            return {**coll, "source": f"collection {dev['collection']}"}
    return {"vdisks": [], "default": None, "source": None}
