"""The boot service's HTTP endpoints for iPXE and the initramfs.

- ``GET /ipxe/boot.ipxe``: the fixed entry script (chains to the per-client script).
- ``GET /ipxe/script?mac=..&uuid=..[&vdisk=..]``: what this client boots: a refusal
  message, a menu of its vdisks, or ``sanboot`` of its new session's HTTP URL.
- ``GET /handoff?mac=..``: the NBD export of that device's live session, for its initramfs.

Scripts are always answered with 200: iPXE shows an HTTP error as a bare error code,
whereas a script can tell the person at the machine what is wrong and retry by itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from services.boot import ipxe_scripts as scripts
from services.boot.boot_trace import BootTraces, boot_span
from services.boot.handoff_store import HandoffStore
from services.boot.http_server import Request, Response
from services.boot.registry_client import RegistryClient
from shared.bus import RemoteError, ServiceUnavailable
from shared.events import BootMenuShown, ClientBooted, Event

log = logging.getLogger("streamboot.boot.ipxe")

_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")
_UUID = re.compile(r"^[0-9a-fA-F-]{32,36}$")
IPXE = "text/plain; charset=utf-8"
RETRY_BUSY_S = 10  # registry away, or a live session that has not closed yet
REFUSED_WAIT_S = 60


def normalize_mac(value: str) -> str | None:
    mac = value.strip().lower()
    return mac.replace("-", ":") if _MAC.match(mac) else None


class BootHttp:
    def __init__(
        self,
        registry: RegistryClient,
        handoffs: HandoffStore,
        emit: Callable[[Event], None],
        *,
        base_url: str,
        menu_timeout_s: int = 10,
        traces: BootTraces | None = None,
    ) -> None:
        self.registry, self.handoffs, self.emit = registry, handoffs, emit
        self.base_url, self.menu_timeout_s = base_url.rstrip("/"), menu_timeout_s
        self.traces = traces

    async def __call__(self, request: Request) -> Response:
        if request.path == "/ipxe/boot.ipxe":
            return Response(200, scripts.boot_script(self.base_url), IPXE)
        if request.path == "/ipxe/script":
            return Response(200, await self.traced_script(request.query), IPXE)
        if request.path == "/handoff":
            return await self.traced("handoff", request.query, self.handoff)
        if request.path == "/booted":
            return await self.traced("booted", request.query, self.booted)
        if request.path == "/healthz":
            return Response(200, "ok\n")
        return Response(404, "not found\n")

    async def traced_script(self, query: dict[str, str]) -> str:
        """The script request as a span of the boot's trace (the registry's lookup and
        session opening become its children through the NATS headers)."""
        mac = normalize_mac(query.get("mac", ""))
        if mac is None or self.traces is None:
            return await self.client_script(query)
        boot = await self.traces.current(mac)
        with boot_span("ipxe script", boot, mac=mac, vdisk=query.get("vdisk")):
            return await self.client_script(query, boot)

    async def traced(
        self,
        name: str,
        query: dict[str, str],
        handler: Callable[[dict[str, str]], Awaitable[Response]],
    ) -> Response:
        """A request of the client's OS (hand-off, booted) as a span of its boot's trace."""
        mac = normalize_mac(query.get("mac", ""))
        entry = await self.handoffs.get(mac) if mac else None
        root = (entry or {}).get("boot_traceparent")
        if not root:
            return await handler(query)
        with boot_span(name, {"traceparent": root}, mac=mac) as span:
            response = await handler(query)
            span.set_attribute("http.status_code", response.status)
            return response

    async def booted(self, query: dict[str, str]) -> Response:
        """The client's OS says it has booted (the end of its boot phase)."""
        mac = normalize_mac(query.get("mac", ""))
        entry = await self.handoffs.get(mac) if mac else None
        if entry is None:
            return Response(404, "no session was opened for this machine\n")
        self.emit(ClientBooted(session_id=entry["session_id"], mac=mac))
        return Response(200, "ok\n")

    async def client_script(self, query: dict[str, str], boot: dict[str, Any] | None = None) -> str:
        mac = normalize_mac(query.get("mac", ""))
        if mac is None:
            log.warning("boot: script asked with a bad MAC %r", query.get("mac"))
            return scripts.message_script([f"bad MAC address {query.get('mac', '')!r}"])
        uuid = query.get("uuid") or None
        if uuid is not None and not _UUID.match(uuid):
            uuid = None  # iPXE leaves ${uuid} empty or odd on some firmware: MAC is enough
        chosen = query.get("vdisk") or None
        retry = scripts.script_url(self.base_url, mac, uuid, chosen)
        try:
            device = await self.registry.lookup(mac, uuid)
            if not device.vdisks:
                return scripts.message_script(
                    [f"{device.hostname or mac}: no vdisk is assigned to this machine",
                     f"assign one: streamboot assign {mac} VDISK"],
                    retry_url=retry, wait_s=REFUSED_WAIT_S,
                )  # fmt: skip
            if chosen is None and len(device.vdisks) > 1:
                self.emit(BootMenuShown(mac=mac, vdisks=device.vdisks, default=device.default))
                return scripts.menu_script(
                    title=f"choose what {device.hostname or mac} boots",
                    vdisks=device.vdisks,
                    default=device.default,
                    timeout_s=self.menu_timeout_s,
                    choice_url={
                        v: scripts.script_url(self.base_url, mac, uuid, v) for v in device.vdisks
                    },
                )
            if chosen is not None:
                if chosen not in device.vdisks:
                    return scripts.message_script(
                        [f"vdisk {chosen} is not assigned to {device.hostname or mac}"],
                        retry_url=scripts.script_url(self.base_url, mac, uuid),
                    )
                self.emit(
                    BootMenuShown(
                        mac=mac, vdisks=device.vdisks, default=device.default, chosen=chosen
                    )
                )
            session = await self.registry.open_session(
                mac, uuid, chosen or device.vdisks[0], boot=boot
            )
        except RemoteError as exc:
            log.warning("boot: %s refused: %s (%s)", mac, exc, exc.kind)
            if exc.kind == "conflict":  # e.g. its previous session is still closing
                return scripts.message_script(
                    [f"cannot boot {mac} now: {exc}"], retry_url=retry, wait_s=RETRY_BUSY_S
                )
            if exc.kind in ("not_found", "refused"):
                return scripts.message_script(
                    [f"this machine ({mac}) may not boot here: {exc}",
                     "an administrator can add it: streamboot device add"],
                    wait_s=REFUSED_WAIT_S,
                )  # fmt: skip
            return scripts.message_script(
                [f"boot server error: {exc}"], retry_url=retry, wait_s=REFUSED_WAIT_S
            )
        except ServiceUnavailable as exc:
            log.error("boot: registry unavailable for %s: %s", mac, exc)
            return scripts.message_script(
                ["the boot server is busy or starting"], retry_url=retry, wait_s=RETRY_BUSY_S
            )
        await self.handoffs.put(mac, session)
        log.info(
            "boot: %s boots %s v%d (session %s)", mac, session.vdisk, session.version,
            session.session_id,
        )  # fmt: skip
        info = scripts.SessionInfo(
            session.vdisk, session.version, session.http_url, session.hostname
        )
        return scripts.sanboot_script(info, retry_url=scripts.script_url(self.base_url, mac, uuid))

    async def handoff(self, query: dict[str, str]) -> Response:
        mac = normalize_mac(query.get("mac", ""))
        if mac is None:
            return Response(400, "bad or missing mac\n")
        entry = await self.handoffs.get(mac)
        if entry is None:
            return Response(404, f"no session was opened for {mac}\n")
        try:
            live = await self.registry.resolve(entry["token"])
        except RemoteError:
            return Response(404, f"no live session for {mac}\n")
        except ServiceUnavailable:
            return Response(503, "registry unavailable, try again\n")
        if normalize_mac(str(live.get("mac", ""))) != mac:
            return Response(404, f"no live session for {mac}\n")
        return Response(
            200,
            scripts.handoff_text(
                nbd_host=entry["nbd_host"],
                nbd_port=entry["nbd_port"],
                export=entry["token"],
                write_cache=live.get("write_cache") or entry["write_cache"],
            ),
        )
