"""Device decisions: register, update, disable/enable, remove, and the unknown-device policy."""

from __future__ import annotations

import uuid

from services.registry.domain.errors import conflict, invalid, not_found, refused
from services.registry.projection import Projection, Record
from shared.events import (
    DeviceDisabled,
    DeviceEnabled,
    DeviceMaintenanceChanged,
    DeviceRegistered,
    DeviceRemoved,
    DeviceUpdated,
    Event,
)
from shared.identity import (
    check_hostname,
    check_kernel_args,
    check_name,
    normalize_mac,
    normalize_uuid,
)


def new_machine_id() -> str:
    """A machine identifier in systemd's machine-id format (32 hex digits, random)."""
    return uuid.uuid4().hex


def get_device(p: Projection, mac: str) -> Record:
    mac = normalize_mac(mac)
    dev = p.devices.get(mac)
    if dev is None:
        raise not_found(f"no device with MAC {mac}")
    return dev


def find_device(p: Projection, mac: str | None, smbios_uuid: str | None) -> Record | None:
    """A device by MAC, else by SMBIOS UUID (a NIC swap keeps the machine)."""
    if mac:
        dev = p.devices.get(normalize_mac(mac))
        if dev is not None:
            return dev
    if smbios_uuid:
        return p.device_by_uuid(normalize_uuid(smbios_uuid))
    return None


def register(
    p: Projection,
    mac: str,
    *,
    hostname: str | None = None,
    smbios_uuid: str | None = None,
    collection: str | None = None,
    tester: bool = False,
    machine_id: str | None = None,
    auto_added: bool = False,
    kernel_args: str | None = None,
) -> list[Event]:
    mac = normalize_mac(mac)
    if mac in p.devices:
        raise conflict(f"a device with MAC {mac} already exists")
    host = check_hostname(hostname) if hostname else "host-" + mac.replace(":", "")
    if host in p.mac_by_hostname:
        raise conflict(f"hostname {host!r} is already used by device {p.mac_by_hostname[host]}")
    uid = normalize_uuid(smbios_uuid) if smbios_uuid else None
    if uid and uid in p.mac_by_uuid:
        raise conflict(f"SMBIOS UUID {uid} is already used by device {p.mac_by_uuid[uid]}")
    mid = machine_id or new_machine_id()
    if mid in p.mac_by_machine_id:
        raise conflict(f"machine identifier {mid} is already used")
    coll = check_name(collection, "collection name") if collection else None
    args = check_kernel_args(kernel_args) if kernel_args else None
    return [
        DeviceRegistered(
            mac=mac,
            machine_id=mid,
            hostname=host,
            smbios_uuid=uid,
            collection=coll,
            tester=tester,
            auto_added=auto_added,
            kernel_args=args or None,
        )
    ]


def auto_add(
    p: Projection,
    mac: str,
    smbios_uuid: str | None,
    *,
    policy: str,
    template: str,
    collection: str | None,
) -> list[Event]:
    """An unknown device boots: refuse it, or register it under the next free templated name."""
    mac = normalize_mac(mac)
    if policy != "auto-add":
        raise refused(
            f"unknown device {mac}: this registry refuses unknown devices "
            "(unknown_device_policy=refuse); add it with `streamboot device add`"
        )
    n = p.auto_added + 1
    while True:
        try:
            name = template.format(n=n, mac=mac.replace(":", ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise invalid(f"bad auto_add_name_template {template!r}: {exc}") from None
        if check_hostname(name) not in p.mac_by_hostname:
            break
        n += 1
    return register(
        p, mac, hostname=name, smbios_uuid=smbios_uuid, collection=collection, auto_added=True
    )


def update(
    p: Projection,
    mac: str,
    *,
    hostname: str | None = None,
    smbios_uuid: str | None = None,
    collection: str | None = None,
    tester: bool | None = None,
    kernel_args: str | None = None,
) -> list[Event]:
    dev = get_device(p, mac)
    args = check_kernel_args(kernel_args) if kernel_args is not None else None
    host = check_hostname(hostname) if hostname else None
    if host and host != dev["hostname"] and host in p.mac_by_hostname:
        raise conflict(f"hostname {host!r} is already used by device {p.mac_by_hostname[host]}")
    uid = normalize_uuid(smbios_uuid) if smbios_uuid else None
    if uid and p.mac_by_uuid.get(uid, dev["mac"]) != dev["mac"]:
        raise conflict(f"SMBIOS UUID {uid} is already used by device {p.mac_by_uuid[uid]}")
    if collection:
        check_name(collection, "collection name")
    if dev["mac"] in p.session_by_mac and host and host != dev["hostname"]:
        raise conflict(f"device {dev['mac']} has a live session; close it before renaming")
    return [
        DeviceUpdated(
            mac=dev["mac"],
            hostname=host,
            smbios_uuid=uid,
            collection=collection,
            tester=tester,
            kernel_args=args,
        )
    ]


def disable(p: Projection, mac: str) -> list[Event]:
    dev = get_device(p, mac)
    return [DeviceDisabled(mac=dev["mac"])] if dev["enabled"] else []


def enable(p: Projection, mac: str) -> list[Event]:
    dev = get_device(p, mac)
    return [] if dev["enabled"] else [DeviceEnabled(mac=dev["mac"])]


def remove(p: Projection, mac: str) -> list[Event]:
    dev = get_device(p, mac)
    if dev["mac"] in p.session_by_mac:
        raise conflict(
            f"device {dev['mac']} has a live session ({p.session_by_mac[dev['mac']]}); "
            "close it first (`streamboot session close`)"
        )
    return [DeviceRemoved(mac=dev["mac"])]


def set_maintenance(p: Projection, mac: str, on: bool, default_vdisk: str | None) -> list[Event]:
    """The device's next PXE boots open a maintenance session on its default vdisk
    (``default_vdisk``: the caller's reading of its assignment), or no longer do."""
    dev = get_device(p, mac)
    if on and default_vdisk is None:
        raise conflict(
            f"device {dev['mac']} has no vdisk assigned to maintain "
            f"(`streamboot assign {dev['mac']} VDISK --default`)"
        )
    if dev["maintenance"] == on:
        return []  # already so: nothing to record
    return [DeviceMaintenanceChanged(mac=dev["mac"], maintenance=on)]
