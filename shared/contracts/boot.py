"""The boot service's contract with the CLI: the lease file of full-DHCP mode, which
``streamboot dhcp leases`` reads without a running server (the boot service writes it:
services/boot/dhcp_leases.py).

The file is JSON ``{"leases": [{ip, mac, state, hostname, expires}, ...]}`` at
``DATA_DIR/boot/dhcp-leases.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.settings import Settings

LEASES_FILE = ("boot", "dhcp-leases.json")


def leases_path(settings: Settings) -> Path:
    return settings.data_path(*LEASES_FILE)


def read_leases(path: Path) -> list[dict[str, object]]:
    """The lease file as plain dicts."""
    try:
        return list(json.loads(path.read_text()).get("leases", []))
    except FileNotFoundError:
        return []
