"""IP -> MAC for TFTP clients: what DHCP noted, else the kernel's neighbour table."""

from __future__ import annotations

from pathlib import Path

from services.boot.client_addresses import ClientAddresses, neighbour_mac
from services.boot.dhcp_server import DhcpResponder
from tests.boot.test_dhcp import PXE_DISCOVER, full_config, with_options

# /proc/net/arp as Linux writes it: one complete entry, one incomplete (flags 0x0).
ARP = """IP address       HW type     Flags       HW address            Mask     Device
10.0.0.7         0x1         0x2         52:54:00:AA:BB:07     *        br0
10.0.0.8         0x1         0x0         00:00:00:00:00:00     *        br0
"""


def test_neighbour_table(tmp_path: Path) -> None:
    table = tmp_path / "arp"
    table.write_text(ARP)
    assert neighbour_mac("10.0.0.7", table) == "52:54:00:aa:bb:07"
    assert neighbour_mac("10.0.0.8", table) is None  # not resolved
    assert neighbour_mac("10.0.0.9", table) is None
    assert neighbour_mac("10.0.0.7", tmp_path / "missing") is None


def test_noted_addresses_first_then_the_neighbour_table(tmp_path: Path) -> None:
    table = tmp_path / "arp"
    table.write_text(ARP)
    addresses = ClientAddresses(limit=2, arp_table=table)
    addresses.note("10.0.0.7", "52:54:00:00:00:01")
    addresses.note("0.0.0.0", "52:54:00:00:00:02")  # no address yet: nothing to note
    assert addresses.mac_of("10.0.0.7") == "52:54:00:00:00:01"
    addresses.note("10.0.0.1", "52:54:00:00:00:03")
    addresses.note("10.0.0.2", "52:54:00:00:00:04")  # over the limit: the oldest goes
    assert addresses.mac_of("10.0.0.7") == "52:54:00:aa:bb:07"  # from the table now
    assert addresses.mac_of("10.0.0.2") == "52:54:00:00:00:04"


def test_full_dhcp_notes_the_address_it_gives(tmp_path: Path) -> None:
    from services.boot.dhcp_leases import LeaseStore

    config = full_config()
    assert config.pool_start and config.pool_end
    leases = LeaseStore(tmp_path / "leases.json", config.pool_start, config.pool_end)
    addresses = ClientAddresses(arp_table=tmp_path / "none")
    responder = DhcpResponder(config, leases, addresses=addresses)
    offer = responder.handle(with_options(PXE_DISCOVER), now=1000.0)
    assert offer is not None and offer.yiaddr != "0.0.0.0"
    assert addresses.mac_of(offer.yiaddr) == offer.mac
