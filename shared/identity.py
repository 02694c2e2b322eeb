"""Validation and normal forms of identifiers: MACs, SMBIOS UUIDs, hostnames, vdisk names."""

from __future__ import annotations

import re
import uuid

from shared.errors import invalid

_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
# RFC 1123 label: letters, digits, hyphens; not starting or ending with a hyphen.
_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# vdisk names become directory names: keep them boring.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def normalize_mac(mac: str) -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabbccddeeff`` / ``aa:bb:..`` -> ``aa:bb:cc:dd:ee:ff``."""
    m = (mac or "").strip().lower()
    if not _MAC.match(m):
        raise invalid(
            f"invalid MAC address {mac!r}: expected six hex octets like 52:54:00:12:34:56"
        )
    digits = m.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def normalize_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        raise invalid(f"invalid SMBIOS UUID {value!r}") from None


def check_hostname(hostname: str) -> str:
    h = (hostname or "").strip().lower()
    if not _HOSTNAME.match(h):
        raise invalid(
            f"invalid hostname {hostname!r}: 1-63 letters, digits or hyphens, "
            "not starting or ending with a hyphen"
        )
    return h


_KERNEL_ARG = re.compile(r"^[A-Za-z0-9._:/=,+-]{1,200}$")
MAX_KERNEL_ARGS = 1024


def check_kernel_args(args: str) -> str:
    """Extra kernel arguments: words of safe characters (they go onto an iPXE command line
    and into the initramfs's shell), normalised to single spaces; "" clears them."""
    words = args.split()
    bad = [w for w in words if not _KERNEL_ARG.match(w)]
    if bad:
        raise invalid(
            f"invalid kernel argument {bad[0]!r}: letters, digits and ._:/=,+- only "
            "(no quotes, spaces inside a value or shell characters)"
        )
    if any(w.startswith("streamboot.") for w in words):
        raise invalid("streamboot.* kernel arguments are the boot service's own")
    normal = " ".join(words)
    if len(normal) > MAX_KERNEL_ARGS:
        raise invalid(f"kernel arguments longer than {MAX_KERNEL_ARGS} characters")
    return normal


def check_name(name: str, what: str = "vdisk name") -> str:
    if not _NAME.match(name or ""):
        raise invalid(
            f"invalid {what} {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
