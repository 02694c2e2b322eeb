"""The event catalog: one pydantic model per event type, named in the past tense.

An event's model is its ``data``; :func:`envelope` wraps it for the log and the bus, and
:func:`parse` turns an envelope's data back into the typed model. New event types are added
here, so that the whole vocabulary of the system stays in one place.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from shared.envelope import Envelope

log = logging.getLogger("streamboot.events")

CATALOG: dict[str, type[Event]] = {}


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # The aggregate kind this event belongs to; the stream id is f"{stream_kind}-{key}".
    stream_kind: ClassVar[str] = "misc"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CATALOG[cls.__name__] = cls

    @classmethod
    def event_type(cls) -> str:
        return cls.__name__


# --- devices ---------------------------------------------------------------------------


class DeviceEvent(Event):
    stream_kind: ClassVar[str] = "device"
    mac: str


class DeviceRegistered(DeviceEvent):
    machine_id: str
    hostname: str
    smbios_uuid: str | None = None
    collection: str | None = None
    tester: bool = False
    auto_added: bool = False
    # Extra kernel arguments of its kernel-direct boots (words of [A-Za-z0-9._:/=,+-]).
    kernel_args: str | None = None


class DeviceUpdated(DeviceEvent):
    hostname: str | None = None
    smbios_uuid: str | None = None
    collection: str | None = None
    tester: bool | None = None
    kernel_args: str | None = None  # "" clears them


class DeviceDisabled(DeviceEvent):
    pass


class DeviceEnabled(DeviceEvent):
    pass


class DeviceRemoved(DeviceEvent):
    pass


class DeviceMaintenanceChanged(DeviceEvent):
    """The device's next PXE boots open a maintenance session on its default vdisk
    (``maintenance``: true) or boot as usual again (false)."""

    maintenance: bool


class AssignmentChanged(Event):
    """The ordered vdisks of a device (``target`` = MAC) or a collection (``target`` = name)."""

    stream_kind: ClassVar[str] = "assignment"
    target_kind: Literal["device", "collection"]
    target: str
    vdisks: list[str]
    default: str | None = None


class IscsiChapChanged(Event):
    """The CHAP credentials iSCSI logins of a device (``target`` = MAC) or of a collection's
    devices (``target`` = name) must give; all None: CHAP off. The secrets are sealed by
    the registry's key (services/registry/sealing.py): the log never holds them in clear."""

    stream_kind: ClassVar[str] = "chap"
    target_kind: Literal["device", "collection"]
    target: str
    user: str | None = None
    secret_sealed: str | None = None
    # Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    reverse_user: str | None = None
    reverse_secret_sealed: str | None = None


# --- vdisks ----------------------------------------------------------------------------

WriteCacheKind = Literal["server-ram", "server-disk", "client-ram", "client-disk"]
WriteCachePersistence = Literal["discard", "keep"]
VersionStage = Literal["maintenance", "test", "production"]


class VdiskEvent(Event):
    stream_kind: ClassVar[str] = "vdisk"
    name: str


class VdiskCreated(VdiskEvent):
    size: int
    mode: Literal["standard", "private"] = "standard"
    write_cache: WriteCacheKind = "server-disk"
    write_cache_persistence: WriteCachePersistence = "discard"
    store: str = "local"


class VdiskVersionPublished(VdiskEvent):
    version: int
    parent: int | None
    stage: VersionStage
    path: str
    size: int
    checksum: str
    changed_blocks: int
    block_size: int


class VdiskVersionPromoted(VdiskEvent):
    version: int
    stage: VersionStage
    previous_stage: VersionStage


class VdiskRolledBack(VdiskEvent):
    from_version: int
    to_version: int


class VdiskPolicyChanged(VdiskEvent):
    mode: Literal["standard", "private"] | None = None
    write_cache: WriteCacheKind | None = None
    write_cache_persistence: WriteCachePersistence | None = None
    # The store stream and cache nodes read the vdisk's layers from (a name in
    # STREAMBOOT_CACHE_STORES, or "local").
    store: str | None = None
    # auto (kernel-direct when boot files were found, else sanboot), kernel, sanboot (over
    # HTTP), sanboot-iscsi, or nbdroot (kernel-direct for an image without the streamboot
    # client: Debian's own nbdroot= in its initramfs, server-side write caches only), or
    # iscsi-ibft (kernel-direct, the root over iSCSI through the iBFT iPXE leaves: the
    # image's open-iscsi initramfs, server-side write caches only).
    boot_method: (
        Literal["auto", "kernel", "sanboot", "sanboot-iscsi", "nbdroot", "iscsi-ibft"] | None
    ) = None
    # The kernel version versions published from now on boot ("" clears: the newest).
    kernel: str | None = None


class BootFilesScanned(VdiskEvent):
    """What a published version holds to boot kernel-direct: the kernel and initramfs
    chosen (copied to <vdisk dir>/<vdisk>/boot/v<version>/), the root filesystem, every
    kernel seen; or, with ``kernel_version`` None, why there is none (``problem``)."""

    version: int
    kernel_version: str | None = None
    kernel_size: int = 0
    kernel_sha256: str | None = None
    initrd_size: int = 0
    initrd_sha256: str | None = None
    root: str | None = None  # UUID=..., PARTUUID=... or whole
    root_fstype: str | None = None
    kernels: list[str] = []
    chosen_by: Literal["newest", "operator"] | None = None
    problem: str | None = None
    # What attaches the root in the chosen initramfs: the streamboot client, only Debian's
    # NBD root, neither; None when it could not be read (or an older scan).
    initramfs_client: Literal["streamboot", "nbdroot", "none"] | None = None


class VdiskRemoved(VdiskEvent):
    pass


class VdiskChainMerged(VdiskEvent):
    """Versions ``upto`` and later read from ``base`` (the chain up to ``upto`` written
    out as one raw image, block for block the same): ``layers`` maps each of those
    versions to its new layer list. Versions before ``upto`` are retired (no boot picks
    them); ``superseded`` are the layer files no kept version reads any more, removed once
    no live session or kept write cache reads them (VdiskLayersRemoved)."""

    upto: int
    base: str
    checksum: str
    layers: dict[str, list[str]]
    retired: list[int]
    superseded: list[str]


class VdiskLayersRemoved(VdiskEvent):
    """Superseded layer files deleted from the store (nothing reads them any more)."""

    layers: list[str]
    bytes_freed: int


# --- boots and sessions ----------------------------------------------------------------


class BootRequested(Event):
    """A PXE client asked to boot (first DHCP discover), before it opens any session."""

    stream_kind: ClassVar[str] = "boot"
    mac: str
    smbios_uuid: str | None = None
    arch: int | None = None
    vdisk: str | None = None
    version: int | None = None


class BootMenuShown(Event):
    stream_kind: ClassVar[str] = "boot"
    mac: str
    vdisks: list[str]
    default: str | None
    chosen: str | None = None


class SessionEvent(Event):
    stream_kind: ClassVar[str] = "session"
    session_id: str


class SessionOpened(SessionEvent):
    mac: str
    hostname: str
    machine_id: str
    vdisk: str
    version: int
    stream_node: str
    write_cache: WriteCacheKind
    write_cache_persistence: WriteCachePersistence
    read_only: bool = False
    # sha256 of the session token: the log never holds the bearer secret itself.
    token_hash: str | None = None
    nbd_uri: str | None = None
    http_url: str | None = None
    iscsi_portal: str | None = None  # "host:port" of the stream node's iSCSI target
    # Read-write boot of a maintenance version, or of a private-mode vdisk.
    maintenance: bool = False
    writes_to_vdisk: bool = False
    # The boot's trace: its root span's ids and when the boot began (the first DHCP packet,
    # or the session's opening for clients that skip PXE). The root span is written when
    # the session ends.
    boot_traceparent: str | None = None
    boot_started_ns: int | None = None
    # The address the boot service saw the client at: its exports refuse other addresses.
    client_addr: str | None = None


class ReplaySessionOpened(SessionEvent):
    """A session that re-drives a past session's recorded block accesses
    (``streamboot replay blocks``). Not a boot of the device: no ``mac`` field (so it stays
    out of the device's events and timelines), it takes no part in the per-device
    uniqueness rules, its stream node records no BlocksRequested for it (the boot
    profiles learn from real boots only), and its writes go to a discarded write cache."""

    replay_of: str
    original_mac: str
    hostname: str
    vdisk: str
    version: int
    stream_node: str
    write_cache: WriteCacheKind
    write_cache_persistence: WriteCachePersistence = "discard"
    read_only: bool = False
    token_hash: str | None = None
    nbd_uri: str | None = None
    http_url: str | None = None


class ClientBooted(SessionEvent):
    """The client's OS says it has booted: the end of the boot phase (boot profiles, the
    trace's "booted" span)."""

    mac: str


class ClientNotice(SessionEvent):
    """The client tells the operator something it saw at boot: its client-disk write cache
    fell back to RAM (no local partition), its initramfs stopped (``boot-failed``)...
    ``kind`` is a short lower-case word, ``message`` one line of plain text."""

    mac: str
    kind: str
    message: str


class NonceRefused(SessionEvent):
    """A redeem of a kernel-direct boot's nonce was refused (spent, wrong address...)."""

    client_addr: str
    reason: str


class HandoffRedeemed(SessionEvent):
    """A kernel-direct boot's initramfs traded its nonce for the session's export: the
    hand-off from the firmware's boot to the OS's own attach."""

    client_addr: str


class SessionAddressRefused(SessionEvent):
    """A stream node refused a connection to a session from an address other than the
    one the session was issued to."""

    stream_node: str
    protocol: Literal["nbd", "http", "iscsi"]
    client_addr: str
    expected_addr: str


class IscsiLoginRefused(SessionEvent):
    """A stream node refused an iSCSI login to a session: CHAP missing or failed, or an
    initiator other than the device's (``reason`` says which; never a secret)."""

    stream_node: str
    client_addr: str
    initiator: str
    status: int  # the login status sent (class << 8 | detail, RFC 7143 11.13.5)
    reason: str


class SessionConflictRejected(SessionEvent):
    mac: str
    reason: str
    conflicting_session_id: str | None = None


class SessionAttached(SessionEvent):
    """A client connected to a stream node for this session."""

    stream_node: str
    protocol: Literal["nbd", "http", "iscsi"]
    client_addr: str
    # The login of a boot firmware's iSCSI initiator (iPXE's, known by its ISID): it never
    # logs out, and the OS logs in after it from the iBFT (the registry's hand-off grace).
    boot_firmware: bool = False


class SessionDetached(SessionEvent):
    stream_node: str
    protocol: Literal["nbd", "http", "iscsi"]
    client_addr: str
    bytes_read: int
    bytes_written: int
    reason: str = "disconnect"


class SessionClosed(SessionEvent):
    reason: str
    bytes_read: int = 0
    bytes_written: int = 0


class BlocksRequested(SessionEvent):
    """A batch of block accesses: ``extents`` are [t_ms since session start, offset, length, op]
    with op ``r`` (read) or ``w`` (write). ``bytes_read``/``bytes_written``: the data the
    session's connections on this stream node moved so far, counted as SessionDetached
    counts it (a live session's bytes; a trim is an extent that moves no data)."""

    vdisk: str
    version: int
    extents: list[tuple[int, int, int, Literal["r", "w"]]]
    stream_node: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0


class WriteCacheFull(SessionEvent):
    capacity: int
    used: int


class BootProfileUpdated(Event):
    stream_kind: ClassVar[str] = "profile"
    vdisk: str
    version: int
    boots_seen: int
    extents: list[tuple[int, int]]
    bytes: int


class PrefetchCompleted(Event):
    stream_kind: ClassVar[str] = "profile"
    vdisk: str
    version: int
    session_id: str | None = None
    bytes: int
    duration_ms: float


# --- the admin API's tokens and what they did ------------------------------------------

ApiRole = Literal["admin", "operator", "viewer"]


class ApiTokenEvent(Event):
    stream_kind: ClassVar[str] = "apitoken"
    token_name: str


class ApiTokenCreated(ApiTokenEvent):
    role: ApiRole
    # sha256 of the bearer token: the log never holds the token itself.
    token_hash: str
    created_by: str


class ApiTokenRevoked(ApiTokenEvent):
    revoked_by: str


class AdminActionPerformed(ApiTokenEvent):
    """A mutating admin API request and how it ended (the audit trail): by which token,
    with which role. The path carries no secret (a session token in it is masked)."""

    role: ApiRole
    method: str
    path: str
    status: int
    outcome: Literal["done", "refused", "failed"]


# --- the registry itself ----------------------------------------------------------------


class ProjectionError(Event):
    """An event of the log that the registry's projection could not apply (its handler
    raised): it is skipped, and this records which one and why, once."""

    stream_kind: ClassVar[str] = "registry"
    position: int
    event_id: str | None = None
    skipped_type: str
    skipped_stream_id: str
    error: str


def stream_id_for(event: Event) -> str:
    """The aggregate an event belongs to."""
    key: str
    match event:
        case DeviceEvent():
            key = event.mac
        case VdiskEvent():
            key = event.name
        case SessionEvent():
            key = event.session_id
        case AssignmentChanged() | IscsiChapChanged():
            key = f"{event.target_kind}:{event.target}"
        case BootRequested() | BootMenuShown():
            key = event.mac
        case BootProfileUpdated() | PrefetchCompleted():
            key = f"{event.vdisk}@{event.version}"
        case ApiTokenEvent():
            key = event.token_name
        case ProjectionError():
            key = "projection"
        case _:
            key = "misc"
    return f"{event.stream_kind}-{key}"


def envelope(
    event: Event,
    *,
    version: int = 0,
    stream_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    traceparent: str | None = None,
) -> Envelope:
    return Envelope(
        type=event.event_type(),
        stream_id=stream_id or stream_id_for(event),
        version=version,
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
        data=event.model_dump(mode="json"),
    )


def parse(env: Envelope) -> Event:
    """The typed event inside an envelope; unknown types raise KeyError naming the type."""
    try:
        model = CATALOG[env.type]
    except KeyError:
        raise KeyError(f"unknown event type {env.type!r}") from None
    return model.model_validate(env.data)


def subject_of(kind: type[Event]) -> str:
    """The bus subjects events of ``kind`` are published on (any stream kind)."""
    return f"events.{kind.event_type()}.>"


class BadEvent(ValueError):
    """Bytes on the bus that are no event of the catalog."""


def parse_message(data: bytes) -> tuple[Envelope, Event]:
    """The envelope of a bus message and its typed event; :class:`BadEvent` (naming the
    problem) on bytes that are no envelope or hold no event of the catalog."""
    try:
        env = Envelope.model_validate_json(data)
        return env, parse(env)
    except (ValueError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
        raise BadEvent(f"not an event of the catalog: {str(exc).splitlines()[0]}") from None


def parse_event(data: bytes) -> Event:
    """The typed event of a bus message; :class:`BadEvent` on anything else."""
    return parse_message(data)[1]


class Message(Protocol):
    subject: str
    data: bytes


E = TypeVar("E", bound=Event)


def received(msg: Message, kind: type[E]) -> E | None:
    """The event of ``kind`` a bus message holds; None, with a log line naming the
    subject, for bytes that are no event, and None for an event of another type (a
    subscription receives whatever anyone may publish on its subject)."""
    try:
        event = parse_event(msg.data)
    except BadEvent as exc:
        log.warning("skipped a message on %s: %s", msg.subject, exc)
        return None
    return event if isinstance(event, kind) else None
