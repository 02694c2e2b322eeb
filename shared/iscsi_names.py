"""iSCSI names every party agrees on: the registry hands them out, the boot service writes
them into iPXE scripts, the stream node's target checks them at login."""

from __future__ import annotations

# A target name carries the session token, as an NBD export name does (docs/iscsi.md).
TARGET_PREFIX = "iqn.2026-12.io.streamboot:"
# A device's own initiator name: the iPXE script sets it, the iBFT hands it to the OS.
INITIATOR_PREFIX = "iqn.2026-12.io.streamboot.client:"


def initiator_iqn(mac: str) -> str:
    """The initiator name of the device with this (normalised) MAC."""
    return INITIATOR_PREFIX + mac.replace(":", "").lower()


def iscsi_uri(portal: str, token: str) -> str:
    """libiscsi's (and QEMU's) form: iscsi://HOST:PORT/TARGET-IQN/0."""
    return f"iscsi://{portal}/{TARGET_PREFIX}{token}/0"
