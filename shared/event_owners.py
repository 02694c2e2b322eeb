"""Who may append which event, and the check every event passes at the log's door.

Each event type has one owner: the service whose decisions or observations it records. The
registry's own events (devices, vdisks, assignments, the sessions' opening and closing...)
are appended by the registry in process and never come over the bus; the other services
append theirs through ``streamboot.events.append.<service>`` (shared/event_log.py), where
:func:`admit` checks each one before anything of the batch is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from shared.envelope import Envelope
from shared.events import CATALOG, stream_id_for

REGISTRY_EVENTS = (
    "DeviceRegistered",
    "DeviceUpdated",
    "DeviceDisabled",
    "DeviceEnabled",
    "DeviceRemoved",
    "DeviceMaintenanceChanged",
    "AssignmentChanged",
    "IscsiChapChanged",
    "VdiskCreated",
    "VdiskVersionPublished",
    "BootFilesScanned",
    "VdiskVersionPromoted",
    "VdiskRolledBack",
    "VdiskPolicyChanged",
    "VdiskRemoved",
    "VdiskChainMerged",
    "VdiskLayersRemoved",
    "SessionOpened",
    "ReplaySessionOpened",
    "SessionConflictRejected",
    "SessionClosed",
    "ProjectionError",
    # The admin API's tokens and its audit trail: a forged one would be a working token.
    "ApiTokenCreated",
    "ApiTokenRevoked",
    "AdminActionPerformed",
)
# The events each service appends over the bus (what its code emits).
BUS_EVENTS = {
    # DHCP/iPXE: a boot began, the menu it showed, the hand-off to the initramfs (or its
    # refusal), the OS saying it has booted, what the client tells the operator.
    "boot": (
        "BootRequested",
        "BootMenuShown",
        "HandoffRedeemed",
        "ClientBooted",
        "ClientNotice",
        "NonceRefused",
    ),
    # The data plane: clients attaching and leaving, the blocks they read and wrote.
    "stream": (
        "SessionAttached",
        "SessionDetached",
        "BlocksRequested",
        "SessionAddressRefused",
        "IscsiLoginRefused",
    ),
    # Write caches filling up, boot profiles learnt, prefetches done.
    "cache": ("WriteCacheFull", "BootProfileUpdated", "PrefetchCompleted"),
}
OWNERS: dict[str, str] = {
    **dict.fromkeys(REGISTRY_EVENTS, "registry"),
    **{t: service for service, types in BUS_EVENTS.items() for t in types},
}
# An event may be stamped this far ahead of the registry's clock (clock skew between
# machines); later than that it would hold a session's activity in the future.
MAX_CLOCK_AHEAD = timedelta(seconds=60)
MAX_REASON = 500


class Refused(Exception):
    """An event the log does not take: ``kind`` is ``forbidden`` (not the caller's to
    append) or ``invalid`` (not a well-formed event of its type)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def _short(exc: ValidationError) -> str:
    errors = "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors()[:5]
    )
    return errors[:MAX_REASON]


def admit(caller: str, raw: Any, now: datetime | None = None) -> Envelope:
    """The envelope ``caller`` sent, if it may append it and it is a well-formed event of
    its type (strictly: no missing or extra fields, no coerced types, its own stream);
    else :class:`Refused` with the reason."""
    try:
        env = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise Refused("invalid", f"not an event envelope: {_short(exc)}") from None
    model = CATALOG.get(env.type)
    if model is None:
        raise Refused("invalid", f"unknown event type {env.type[:100]!r}")
    owner = OWNERS.get(env.type)
    if owner != caller:
        raise Refused(
            "forbidden", f"{caller!r} may not append {env.type}: only {owner or 'nobody'} does"
        )
    try:
        event = model.model_validate_json(orjson.dumps(env.data), strict=True)
    except ValidationError as exc:
        raise Refused("invalid", f"{env.type} {env.id}: {_short(exc)}") from None
    if env.stream_id != stream_id_for(event):
        raise Refused(
            "invalid",
            f"{env.type} {env.id}: stream {env.stream_id[:200]!r} is not its own "
            f"({stream_id_for(event)!r})",
        )
    now = now or datetime.now(UTC)
    when = env.time if env.time.tzinfo else env.time.replace(tzinfo=UTC)
    if when > now + MAX_CLOCK_AHEAD:
        raise Refused("invalid", f"{env.type} {env.id}: stamped in the future ({env.time})")
    return env
