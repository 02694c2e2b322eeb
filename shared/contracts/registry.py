"""The registry's NATS contract: its subjects, the session record it resolves a token to,
and the client stub the boot and stream services call (the handlers are in
services/registry/nats_api.py): a change of subject or field is a change here only.

Subjects (queue group ``registry``), JSON in and out; an error reply is ``{"error",
"kind"}`` with ``kind`` one of invalid, not_found, conflict, refused, busy, internal; a
``busy`` one (back-pressure on session opens and replays: nothing was done) carries
``"detail": {"retry_after_s": N}``, the delay after which to ask again:

- ``session.open``    {mac, smbios_uuid?, vdisk?, maintenance?, correlation_id?,
  boot_traceparent?, boot_started_ns?, client_addr?} -> the session (token, nbd_uri,
  iscsi_*, initiator_iqn, and over NATS the device's ``chap``: :class:`ChapRecord` or null;
  nbd_nodes: the other live stream nodes' "host:port", http_nodes: the session's HTTP
  URL on each of them, docs/failover.md, ...)
- ``session.resolve`` {token} -> :class:`SessionRecord` (with the device's CHAP
  credentials in clear: only the stream and boot roles may ask)
- ``session.nodes``   {token} -> :class:`SessionNodes`: every live stream node's NBD
  endpoint now, least loaded first, for a running client whose nodes all failed
  (docs/failover.md); ``not_found`` once the session is closed
- ``session.close``   {token | session_id, reason?}
- ``session.replay``  {session_id, stream_node?} -> a replay session
- ``session.list``    {}
- ``session.status``  {session_id} -> {session_id, live, closed, reason}
- ``device.lookup``   {mac, smbios_uuid?} -> the device and its vdisks
- ``vdisk.list``      {}

Errors arrive as :class:`shared.bus.RemoteError` (``kind``: not_found, refused, conflict,
invalid, busy, internal) or :class:`shared.bus.ServiceUnavailable`; callers decide what the
client is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.bus import request_json

PREFIX = "streamboot.registry"
QUEUE = "registry"
LOOKUP = f"{PREFIX}.device.lookup"
OPEN = f"{PREFIX}.session.open"
RESOLVE = f"{PREFIX}.session.resolve"
NODES = f"{PREFIX}.session.nodes"
CLOSE = f"{PREFIX}.session.close"
REPLAY = f"{PREFIX}.session.replay"
LIST = f"{PREFIX}.session.list"
STATUS = f"{PREFIX}.session.status"
VDISK_LIST = f"{PREFIX}.vdisk.list"
# Every subject the registry answers, for the permissions and the docs.
SUBJECTS = (OPEN, RESOLVE, NODES, CLOSE, REPLAY, LIST, STATUS, LOOKUP, VDISK_LIST)
ERROR_KINDS = ("invalid", "not_found", "conflict", "refused", "busy", "internal")


class ChapRecord(BaseModel):
    """A device's CHAP credentials in clear (``session.resolve`` and ``session.open`` over
    NATS only): a user and a secret, and for mutual CHAP both reverse ones or neither."""

    model_config = ConfigDict(frozen=True)

    user: str = Field(min_length=1)
    secret: str = Field(min_length=1)
    reverse_user: str | None = Field(default=None, min_length=1)
    reverse_secret: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _both_reverse_or_neither(self) -> ChapRecord:
        if (self.reverse_user is None) != (self.reverse_secret is None):
            raise ValueError("chap needs both reverse ones or neither")
        return self

    def __repr__(self) -> str:  # never a secret in a log line or a traceback
        return f"ChapRecord(user={self.user!r}, mutual={self.reverse_user is not None})"

    __str__ = __repr__


class SessionRecord(BaseModel):
    """What a session token opens (``session.resolve``'s answer; also the body of a
    session announced to a stream node, plus its token): the export a stream node serves."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    vdisk: str
    version: int
    size: int
    layers: list[str]
    # None for a replay: nothing on the node may be keyed by its MAC.
    mac: str | None = None
    hostname: str | None = None
    read_only: bool = False
    write_cache: str = "server-ram"
    write_cache_persistence: str = "discard"
    writes_to_vdisk: bool = False
    store: str = "local"
    boot_traceparent: str | None = None
    # Set for a replay: the stream node records no BlocksRequested for it.
    replay_of: str | None = None
    # The only address the session's exports accept (None: any).
    client_addr: str | None = None
    # What its iSCSI logins must give: CHAP (None: no CHAP) and the device's initiator
    # name (None: any). Only the stream and boot roles get this answer (docs/security.md,
    # "iSCSI CHAP secrets").
    chap: ChapRecord | None = None
    initiator_iqn: str | None = None


class SessionNodes(BaseModel):
    """Where a live session's client may reattach now (``session.nodes``' answer): the
    address its exports accept (None: any) and every live stream node's "host:port"."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    client_addr: str | None = None
    nbd_nodes: list[str] = Field(default_factory=list, max_length=64)


@dataclass(frozen=True)
class Device:
    mac: str
    hostname: str | None
    vdisks: list[str]
    default: str | None
    production: dict[str, int | None]  # vdisk -> its production version
    # In maintenance: it boots its default vdisk read-write, without a menu.
    maintenance: bool = False

    @property
    def likely_boot(self) -> tuple[str | None, int | None]:
        """What it will most likely boot (for prefetching; the session decides for real)."""
        name = self.default or (self.vdisks[0] if self.vdisks else None)
        return name, self.production.get(name) if name else None


@dataclass(frozen=True)
class Session:
    session_id: str
    token: str
    vdisk: str
    version: int
    http_url: str
    nbd_host: str
    nbd_port: int
    write_cache: str
    hostname: str | None
    # The boot's trace root (the boot service's boot_trace.py).
    boot_traceparent: str | None = None
    machine_id: str | None = None
    write_cache_persistence: str = "discard"
    # How it boots (the registry's answer): {"method": "kernel"|"nbdroot"|"iscsi-ibft"|"sanboot"|"sanboot-iscsi", "root",
    # "kernel_version", "reason"}; None from a registry that does not say.
    boot: dict[str, Any] | None = None
    kernel_args: str | None = None  # the device's extra kernel arguments
    # iSCSI: the stream node's portal ("host:port"), the session's target name, the
    # device's initiator name and its CHAP credentials ({user, secret, reverse_*} or None).
    iscsi_portal: str | None = None
    iscsi_target: str | None = None
    initiator_iqn: str | None = None
    chap: dict[str, Any] | None = None
    # The other live stream nodes' NBD endpoints ("host:port"), where the client reattaches
    # when its node dies (docs/failover.md).
    nbd_nodes: tuple[str, ...] = ()
    # The same session's HTTP range URL on each of those nodes (iPXE's multipath sanboot).
    http_nodes: tuple[str, ...] = ()


class RegistryClient:
    def __init__(self, nc: NATS, timeout_s: float = 5.0) -> None:
        self.nc, self.timeout_s = nc, timeout_s

    async def lookup(self, mac: str, smbios_uuid: str | None) -> Device:
        """Who a booting client is; the registry applies the unknown-device policy
        (auto-add, or a ``not_found``/``refused`` error)."""
        reply = await request_json(
            self.nc, LOOKUP, {"mac": mac, "smbios_uuid": smbios_uuid}, timeout_s=self.timeout_s
        )
        items = reply.get("vdisks", [])
        vdisks = [v["name"] for v in items]
        default = next((v["name"] for v in items if v.get("default")), None)
        production = {v["name"]: v.get("production") for v in items}
        return Device(
            reply["mac"], reply.get("hostname"), vdisks, default, production,
            maintenance=bool(reply.get("maintenance")),
        )  # fmt: skip

    async def open_session(
        self,
        mac: str,
        smbios_uuid: str | None,
        vdisk: str | None,
        correlation_id: str | None = None,
        boot: dict[str, Any] | None = None,
        client_addr: str | None = None,
    ) -> Session:
        """Open a boot session; ``client_addr``: the requester's address, which the
        session's exports then accept connections from (docs/security.md)."""
        body: dict[str, Any] = {"mac": mac, "smbios_uuid": smbios_uuid, "vdisk": vdisk}
        if client_addr:
            body["client_addr"] = client_addr
        if correlation_id:
            body["correlation_id"] = correlation_id
        if boot:
            body["boot_traceparent"] = boot["traceparent"]
            body["boot_started_ns"] = boot["started_ns"]
        reply = await request_json(self.nc, OPEN, body, timeout_s=self.timeout_s)
        nbd = urlsplit(reply["nbd_uri"])  # nbd://host:port/TOKEN
        return Session(
            session_id=reply["session_id"],
            token=reply["token"],
            vdisk=reply["vdisk"],
            version=int(reply["version"]),
            http_url=reply["http_url"],
            nbd_host=nbd.hostname or "",
            nbd_port=nbd.port or 10809,
            write_cache=reply.get("write_cache", ""),
            hostname=reply.get("hostname"),
            boot_traceparent=reply.get("boot_traceparent"),
            machine_id=reply.get("machine_id"),
            write_cache_persistence=reply.get("write_cache_persistence") or "discard",
            boot=reply.get("boot"),
            kernel_args=reply.get("kernel_args"),
            iscsi_portal=reply.get("iscsi_portal"),
            iscsi_target=reply.get("iscsi_target"),
            initiator_iqn=reply.get("initiator_iqn"),
            chap=reply.get("chap"),
            nbd_nodes=tuple(str(n) for n in reply.get("nbd_nodes") or ()),
            http_nodes=tuple(str(n) for n in reply.get("http_nodes") or ()),
        )

    async def close(self, token: str, reason: str) -> None:
        await request_json(
            self.nc, CLOSE, {"token": token, "reason": reason}, timeout_s=self.timeout_s
        )

    async def resolve(self, token: str) -> SessionRecord:
        """The live session a token opens (``not_found`` once it is closed; a malformed
        answer is a ``ValueError``)."""
        reply = await request_json(self.nc, RESOLVE, {"token": token}, timeout_s=self.timeout_s)
        return SessionRecord.model_validate(reply)

    async def session_nodes(self, token: str) -> SessionNodes:
        """The live stream nodes a session's client may reattach to now (``not_found``
        once it is closed; a malformed answer is a ``ValueError``)."""
        reply = await request_json(self.nc, NODES, {"token": token}, timeout_s=self.timeout_s)
        return SessionNodes.model_validate(reply)
