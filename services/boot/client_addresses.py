"""Which machine an IP address belongs to, for requests that carry no MAC (TFTP).

A TFTP request says nothing about the client but its address; to hang the transfer's span
under the right boot, the boot service needs the MAC. DHCP saw it first (the address it
offered, or the one the client asked for or already had); failing that, the kernel's
neighbour table knows the peer it has just exchanged packets with on the same link.
"""

from __future__ import annotations

from pathlib import Path

ARP_TABLE = Path("/proc/net/arp")
ARP_COMPLETE = 0x2


class ClientAddresses:
    def __init__(self, limit: int = 4096, arp_table: Path = ARP_TABLE) -> None:
        self.limit = limit
        self.arp_table = arp_table
        self._macs: dict[str, str] = {}  # insertion order = age: the oldest go first

    def note(self, ip: str | None, mac: str) -> None:
        if not ip or ip == "0.0.0.0":
            return
        self._macs.pop(ip, None)
        self._macs[ip] = mac
        while len(self._macs) > self.limit:
            del self._macs[next(iter(self._macs))]

    def mac_of(self, ip: str) -> str | None:
        return self._macs.get(ip) or neighbour_mac(ip, self.arp_table)


def neighbour_mac(ip: str, arp_table: Path = ARP_TABLE) -> str | None:
    """The MAC of ``ip`` in the kernel's IPv4 neighbour table, when it has a complete entry."""
    try:
        lines = arp_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        # IP address, HW type, Flags, HW address, Mask, Device
        fields = line.split()
        if len(fields) >= 4 and fields[0] == ip and int(fields[2], 16) & ARP_COMPLETE:
            return fields[3].lower()
    return None
