"""What the stream servers need from the rest of the system: exports, resolvers, event sinks.

The NBD and HTTP servers know nothing about NATS or the registry. They ask a
:class:`SessionResolver` what a session token opens (an :class:`ExportSpec`) and tell an
:class:`EventSink` what happened. The service wires both to the bus; the standalone
server uses a fixed table and no events (``standalone.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.events import Event, WriteCacheKind, WriteCachePersistence


@dataclass(frozen=True)
class ChapSecrets:
    """What an iSCSI login to the session must prove (CHAP, RFC 1994 with MD5) and, for
    mutual CHAP, what the target answers the initiator's challenge with."""

    user: str
    secret: str
    reverse_user: str | None = None
    reverse_secret: str | None = None

    def __repr__(self) -> str:  # never a secret in a log line or a traceback
        return f"ChapSecrets(user={self.user!r}, mutual={self.reverse_user is not None})"


@dataclass(frozen=True)
class ExportSpec:
    """One session's view of a vdisk version, as the registry describes it."""

    session_id: str
    vdisk: str
    version: int
    # Version chain, oldest first (see shared.vdisk_layout): base image, then delta maps.
    layers: tuple[Path, ...]
    size: int
    write_cache: WriteCacheKind = "server-ram"
    # Client-side write caches get a read-only export; so may an explicit flag.
    read_only: bool = False
    # ``keep``: the device's writes outlive the session (the cache service keys them by MAC).
    write_cache_persistence: WriteCachePersistence = "discard"
    mac: str | None = None
    # Where the layers live: ``local`` (paths on this node) or a store of the cache service
    # (``ftp``, ``blockdev``...): then clean reads go through its shared read cache.
    store: str = "local"
    # The boot's trace root: this node's connection spans hang under it.
    traceparent: str | None = None
    # False for a replay session (``streamboot replay blocks``): its accesses are a past
    # boot's, so they are not logged again as BlocksRequested (boot profiles learn from
    # those, and the replay's client measures its own requests).
    record_blocks: bool = True
    # The address the session was issued to: other addresses are refused (None: any).
    client_addr: str | None = None
    # iSCSI logins must pass CHAP with these (None: no CHAP).
    chap: ChapSecrets | None = None
    # The only iSCSI initiator name its logins may give (None: any).
    initiator_iqn: str | None = None

    @property
    def export_read_only(self) -> bool:
        return self.read_only or self.write_cache in ("client-ram", "client-disk")


class SessionResolver(Protocol):
    async def resolve(self, token: str) -> ExportSpec | None:
        """The export a session token opens, or None when the token is unknown."""
        ...


class EventSink(Protocol):
    async def emit(self, event: Event, correlation_id: str | None) -> None: ...
