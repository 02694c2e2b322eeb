"""The address pool of full-DHCP mode and its leases, kept in a JSON file across restarts.

DHCP traffic is a few packets per boot, so every change rewrites the file (atomically:
a temp file renamed over the old one); a crash never leaves a half-written lease file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# An offer holds its address this long for the client's REQUEST.
OFFER_HOLD_S = 60.0


@dataclass
class Lease:
    mac: str
    ip: str
    expires: float  # epoch seconds
    state: Literal["offered", "bound", "declined"]
    hostname: str | None = None


class PoolExhausted(Exception):
    pass


class LeaseStore:
    def __init__(self, path: Path, pool_start: str, pool_end: str) -> None:
        self.path = path
        start, end = ipaddress.IPv4Address(pool_start), ipaddress.IPv4Address(pool_end)
        if end < start:
            raise ValueError(f"empty DHCP pool {pool_start}-{pool_end}")
        self.pool = [str(ipaddress.IPv4Address(n)) for n in range(int(start), int(end) + 1)]
        self._in_pool = set(self.pool)
        self.by_mac: dict[str, Lease] = {}
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        for item in raw.get("leases", []):
            lease = Lease(**item)
            self.by_mac[lease.mac] = lease

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"leases": [asdict(x) for x in self.by_mac.values()]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".leases-")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)

    def _holder(self, ip: str, now: float) -> Lease | None:
        for lease in self.by_mac.values():
            if lease.ip == ip and lease.expires > now:
                return lease
        return None

    def choose(self, mac: str, requested: str | None, now: float) -> str:
        """The address to offer ``mac``: its own lease (even expired, if still free), the
        one it asks for if free, else the first free one, else the longest-expired one."""
        own = self.by_mac.get(mac)
        if own and own.state != "declined" and self._holder(own.ip, now) in (None, own):
            return own.ip
        if (
            requested is not None
            and requested in self._in_pool
            and self._holder(requested, now) is None
        ):
            return requested
        taken = {x.ip for x in self.by_mac.values() if x.expires > now}
        for ip in self.pool:
            if ip not in taken and ip not in {x.ip for x in self.by_mac.values()}:
                return ip
        for ip in self.pool:
            if ip not in taken:
                return ip
        raise PoolExhausted(f"no free address in {self.pool[0]}-{self.pool[-1]}")

    def offer(self, mac: str, requested: str | None, now: float) -> Lease:
        ip = self.choose(mac, requested, now)
        self._drop_others(mac, ip)
        lease = Lease(mac, ip, now + OFFER_HOLD_S, "offered", self._hostname(mac))
        self.by_mac[mac] = lease
        self._save()
        return lease

    def bind(
        self, mac: str, ip: str, lease_s: float, now: float, hostname: str | None
    ) -> Lease | None:
        """Confirm a REQUEST for ``ip``; None when that address is not the client's to take."""
        if ip not in self._in_pool:
            return None
        holder = self._holder(ip, now)
        if holder is not None and holder.mac != mac:
            return None
        self._drop_others(mac, ip)
        lease = Lease(mac, ip, now + lease_s, "bound", hostname or self._hostname(mac))
        self.by_mac[mac] = lease
        self._save()
        return lease

    def release(self, mac: str, now: float) -> None:
        lease = self.by_mac.get(mac)
        if lease is not None and lease.state == "bound":
            lease.expires = now  # kept: the client gets the same address next time
            self._save()

    def decline(self, mac: str, ip: str, now: float) -> None:
        """The client found ``ip`` in use (ARP): keep it out of the pool for a while."""
        self.by_mac.pop(mac, None)
        self.by_mac[f"declined:{ip}"] = Lease(f"declined:{ip}", ip, now + 600, "declined")
        self._save()

    def _drop_others(self, mac: str, ip: str) -> None:
        for key in [k for k, x in self.by_mac.items() if x.ip == ip and k != mac]:
            del self.by_mac[key]

    def _hostname(self, mac: str) -> str | None:
        lease = self.by_mac.get(mac)
        return lease.hostname if lease else None

    def leases(self) -> list[Lease]:
        return sorted(self.by_mac.values(), key=lambda x: ipaddress.IPv4Address(x.ip))


def read_leases(path: Path) -> list[dict[str, object]]:
    """The lease file as plain dicts (the CLI reads it without a running server)."""
    try:
        return list(json.loads(path.read_text()).get("leases", []))
    except FileNotFoundError:
        return []
