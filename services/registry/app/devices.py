"""Devices: registration, maintenance, Wake-on-LAN, the boot-time lookup, their CHAP
credentials and their vdisk assignments."""

from __future__ import annotations

import asyncio
from typing import Any

from services.registry.app.core import CommandCore, log
from services.registry.domain import assignments, chap, devices, vdisks
from services.registry.domain.errors import invalid, not_found, refused
from services.registry.projection import Projection, Record
from services.registry.sealing import Sealer, SealingError, load_sealer
from services.registry.wake import send_magic_packet
from shared.contracts.registry import ChapRecord
from shared.events import Event


class DeviceCommands(CommandCore):
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

    async def start(self) -> int:
        n = await super().start()
        if self.settings.sealing_key or self.settings.sealing_key_file:
            _ = self.sealer  # a key given but unusable stops the start, not a later CHAP set
        return n

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
